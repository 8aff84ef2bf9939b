//! The `ttrl-serve` command line.

use std::io::Write;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use ttrl_serve::config::Settings;
use ttrl_serve::generation::{decode_step, Sequence, StopRules};
use ttrl_serve::model::{ChatMessage, LoadedModel, ModelSource};
use ttrl_serve::sampling::{Sampler, Sampling};

mod bench;
mod eval_command;
mod serve;

#[derive(Parser)]
#[command(
    name = "ttrl-serve",
    version,
    about = "An inference server that learns from the questions it answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one chat prompt, streaming the reply to stdout.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure decode, prefill and training speed on the model.
    Bench(bench::BenchArgs),
    /// Compare base and adapted arms on a question set: accuracy, cost and charts.
    Eval(eval_command::EvalArgs),
}

/// Which model to run and where.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// An HF directory, a .gguf file or an `org/name` hub id; default: SmolLM2-135M-Instruct.
    #[arg(long, env = "TTRL_MODEL")]
    pub model: Option<String>,
    /// `cpu` or `cuda:N` (needs the `cuda` feature); default cpu.
    #[arg(long, env = "TTRL_DEVICE")]
    pub device: Option<String>,
}

impl ModelArgs {
    /// The settings file (or the defaults) with this model and device applied.
    pub fn settings(&self, file: Option<&std::path::Path>) -> Result<Settings> {
        let mut s = match file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        if let Some(v) = &self.model {
            s.model.source = Some(v.clone());
        }
        if let Some(v) = &self.device {
            s.model.device = v.clone();
        }
        Ok(s)
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let device = parse_device(self.device.as_deref().unwrap_or("cpu"))?;
        // bf16 on a GPU, f32 on the CPU (candle's CPU bf16 matmul is far slower than f32).
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let source = self
            .model
            .as_deref()
            .map_or(ModelSource::Default, ModelSource::parse);
        source.load(dtype, &device).context("loading the model")
    }
}

fn parse_device(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = spec
        .strip_prefix("cuda")
        .map(|r| r.trim_start_matches(':'))
        .map(|r| {
            if r.is_empty() {
                Ok(0)
            } else {
                r.parse::<usize>()
            }
        })
        .with_context(|| format!("unknown device `{spec}` (use cpu or cuda:N)"))?
        .with_context(|| format!("bad device ordinal in `{spec}`"))?;
    Ok(Device::new_cuda(ordinal)?)
}

#[derive(Args)]
struct GenerateArgs {
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

fn generate(args: GenerateArgs) -> Result<()> {
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

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(args) => eval_command::run(args),
    }
}
