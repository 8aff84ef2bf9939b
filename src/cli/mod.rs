//! The `ttrl-serve` command line: one module per subcommand, and what they share (the model
//! and device to run).

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use ttrl_serve::config::Settings;
use ttrl_serve::model::{LoadedModel, ModelSource};

mod bench;
mod eval;
mod generate;
mod serve;

#[derive(Parser)]
#[command(
    name = "ttrl-serve",
    version,
    about = "An inference server that learns from the questions it answers"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one chat prompt, streaming the reply to stdout.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure decode, prefill and training speed on the model.
    Bench(bench::BenchArgs),
    /// Compare base and adapted arms on a question set: accuracy, cost and charts.
    Eval(eval::EvalArgs),
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

/// Runs the subcommand the command line names.
pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(args) => eval::run(args),
    }
}
