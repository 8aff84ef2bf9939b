//! `ttrl-serve bench`: decode, prefill and training throughput on one model, printed as a
//! table. Figures, never assertions: the numbers go in notes, not tests.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use clap::Args;

use ttrl_serve::adapt::{run_episode, AdaptConfig, EpisodeLimits, Learner, Question};
use ttrl_serve::generation::{decode_step, run_to_end, Sequence, StopRules};
use ttrl_serve::model::lora::lora_dtype;
use ttrl_serve::model::ops::token_logp_entropy;
use ttrl_serve::model::{Adapter, ChatMessage, LoadedModel, LogitsFor, LoraConfig, SeqInput};
use ttrl_serve::reward::AnswerFormat;
use ttrl_serve::sampling::{Sampler, Sampling};

use super::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Decode batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8, 32])]
    batch: Vec<usize>,
    /// Tokens generated per sequence in the decode runs.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Prompt length of the prefill run.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Sequences x tokens of the forward+backward run.
    #[arg(long, default_value_t = 16)]
    train_sequences: usize,
    #[arg(long, default_value_t = 128)]
    train_tokens: usize,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Questions of the timed adaptation episode (0 skips it).
    #[arg(long, default_value_t = 8)]
    episode_questions: usize,
    /// Leaves per question and rollout length of that episode.
    #[arg(long, default_value_t = 16)]
    episode_samples: usize,
    #[arg(long, default_value_t = 96)]
    episode_max_tokens: usize,
}

/// Deterministic pseudo-random token ids inside the vocabulary.
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab.min(30_000)) as u32)
        .collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    let LoadedModel {
        name,
        model,
        tokenizer,
    } = args.model.load()?;
    let vocab = model.config().vocab_size;
    println!(
        "model: {name} ({:.1} MB of weights, {:?})",
        model.weight_bytes() as f64 / 1e6,
        model.dtype()
    );
    println!("| measurement | value |");
    println!("|---|---|");

    // Prefill: one long prompt in one forward.
    let prompt = tokens(args.prefill_tokens, vocab, 1);
    let mut cache = model.new_cache();
    let t = Instant::now();
    model.forward(
        &mut [SeqInput::cached(&prompt, &mut cache)],
        None,
        LogitsFor::Last,
    )?;
    println!(
        "| prefill {} tokens | {:.1} tok/s |",
        prompt.len(),
        prompt.len() as f64 / t.elapsed().as_secs_f64()
    );

    // Decode: `b` sequences, 16-token prompts, `new_tokens` each, EOS ignored.
    for &b in &args.batch {
        let rules = StopRules {
            max_tokens: args.new_tokens,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
        };
        let mut seqs: Vec<Sequence> = (0..b)
            .map(|i| {
                Sequence::new(
                    &model,
                    tokens(16, vocab, i + 2),
                    Sampler::new(Sampling::new(0.7, None, 1.0), i as u64),
                    rules.clone(),
                    0,
                )
            })
            .collect();
        // The first step prefills the prompts; time the rest.
        decode_step(
            &model,
            &tokenizer,
            &mut seqs.iter_mut().collect::<Vec<_>>(),
            None,
        )?;
        let t = Instant::now();
        run_to_end(&model, &tokenizer, &mut seqs, None)?;
        // Every step after the first added one token to each sequence.
        let steps = args.new_tokens - 1;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| decode batch {b} | {:.1} tok/s ({:.1} ms/step) |",
            (steps * b) as f64 / secs,
            1e3 * secs / steps as f64
        );
    }

    // Forward + backward of a policy-gradient-shaped loss through LoRA on every projection.
    let lora = LoraConfig {
        rank: args.lora_rank,
        ..Default::default()
    };
    let adapter = Adapter::new(
        "bench",
        lora,
        model.config(),
        lora_dtype(model.dtype()),
        model.device(),
        0,
    )?;
    let seqs: Vec<Vec<u32>> = (0..args.train_sequences)
        .map(|i| tokens(args.train_tokens, vocab, 100 + i))
        .collect();
    // Next-token cross-entropy, through the path the adaptation update takes: logits and
    // log-probs one sequence at a time, layers recomputed in backward.
    let t = Instant::now();
    let mut inputs: Vec<SeqInput> = seqs.iter().map(|s| SeqInput::new(s)).collect();
    let (grads, forward) =
        model.adapter_gradients(&mut inputs, &adapter, LogitsFor::All, |hidden| {
            let forward = t.elapsed().as_secs_f64();
            let rows = hidden.dim(0)? as f64;
            let mut row_grads = Vec::with_capacity(seqs.len());
            for (i, s) in seqs.iter().enumerate() {
                let n = s.len();
                let h = Var::from_tensor(&hidden.narrow(0, i * n, n)?)?;
                let logits = model.logits(h.as_tensor())?.to_dtype(DType::F32)?;
                let targets: Vec<u32> = s[1..].iter().copied().chain([0]).collect();
                let (logp, _) = token_logp_entropy(&logits, &targets, 1.0)?;
                let loss = (logp.sum_all()?.neg()? / rows)?;
                row_grads.push(loss.backward()?.remove(h.as_tensor()).expect("logits of h"));
            }
            Ok((Tensor::cat(&row_grads, 0)?, forward))
        })?;
    let total = t.elapsed().as_secs_f64();
    let with_grad = grads.iter().flatten().count();
    println!(
        "| forward+backward {}x{} tokens, LoRA r={} | {total:.2} s (forward {forward:.2} s; {with_grad} LoRA tensors with gradients) |",
        args.train_sequences, args.train_tokens, args.lora_rank
    );
    drop(grads);

    if args.episode_questions > 0 {
        // One episode at the server's adaptation defaults, end to end (rollouts, votes,
        // update), on questions the model answers and mostly agrees on: single-digit sums.
        let config = AdaptConfig {
            samples: args.episode_samples,
            max_tokens: args.episode_max_tokens,
            ..Default::default()
        };
        let questions = (0..args.episode_questions)
            .map(|i| {
                let text = format!(
                    "What is {} plus {}? Answer with just the number.",
                    1 + i % 9,
                    1 + (i * 4 + 3) % 9
                );
                let prompt = tokenizer.apply_chat_template(&[ChatMessage::user(text.clone())])?;
                Ok(Question::new(
                    text,
                    tokenizer.encode(&prompt)?,
                    AnswerFormat::Number,
                ))
            })
            .collect::<Result<Vec<Question>>>()?;
        let mut learner = Learner::new(adapter, &config, 0)?;
        // On a pool thread, as the server's trainer runs its episodes.
        let report = rayon::scope(|_| {
            run_episode(
                &model,
                &tokenizer,
                &mut learner,
                &questions,
                &config,
                7,
                &EpisodeLimits::default(),
            )
        })?;
        let (rollout_ms, update_ms) = report
            .steps
            .iter()
            .fold((0, 0), |(r, u), s| (r + s.rollout_ms, u + s.update_ms));
        let rounds: Vec<String> = report
            .steps
            .iter()
            .map(|s| {
                format!(
                    "{:.2} + {:.2} s, {} trained",
                    s.rollout_ms as f64 / 1e3,
                    s.update_ms as f64 / 1e3,
                    s.trained_questions
                )
            })
            .collect();
        println!(
            "| adaptation episode, {} questions x {} leaves, up to {} tokens | {:.2} s (rollouts {:.2} s, {} tokens; update {:.2} s; by round, rollouts + update and questions trained: {}; peak {} above start){} |",
            args.episode_questions,
            args.episode_samples,
            args.episode_max_tokens,
            report.duration_ms as f64 / 1e3,
            rollout_ms as f64 / 1e3,
            report.rollout_tokens,
            update_ms as f64 / 1e3,
            rounds.join(" / "),
            report
                .peak_memory_bytes
                .map_or("unknown".into(), |b| format!("{:.2} GB", b as f64 / 1e9)),
            report
                .note
                .filter(|_| !report.applied)
                .map_or(String::new(), |n| format!("; no update: {n}")),
        );
    }
    println!(
        "| peak resident memory | {:.2} GB |",
        ttrl_serve::model::memory::peak_resident_bytes().unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}
