//! `ttrl-serve generate`: one chat prompt, the reply streamed to stdout.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use ttrl_serve::generation::{decode_step, Sequence, StopRules};
use ttrl_serve::model::{ChatMessage, LoadedModel};
use ttrl_serve::sampling::{Sampler, Sampling};

use super::ModelArgs;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let LoadedModel {
        model, tokenizer, ..
    } = args.model.load()?;
    let text = tokenizer.apply_chat_template(&[ChatMessage::user(args.prompt)])?;
    let prompt = tokenizer.encode(&text)?;
    let sampler = Sampler::new(
        Sampling::new(args.temperature, args.top_k, args.top_p),
        args.seed,
    );
    let rules = StopRules {
        max_tokens: args.max_tokens,
        stop_ids: tokenizer.stop_ids().to_vec(),
        stop_strings: Vec::new(),
    };
    let mut seq = Sequence::new(&model, prompt, sampler, rules, 0);
    let mut stdout = std::io::stdout().lock();
    let mut shown = 0;
    while !seq.is_finished() {
        decode_step(&model, &tokenizer, &mut [&mut seq], None)?;
        let text = seq.text();
        stdout.write_all(&text.as_bytes()[shown..])?;
        stdout.flush()?;
        shown = text.len();
    }
    writeln!(stdout)?;
    Ok(())
}
