//! `ttrl-serve eval`: against a running server (`--against URL`), or against a server
//! started in this process on a loopback port, so both ways run the same HTTP path.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use ttrl_serve::adapt::AdaptConfig;
use ttrl_serve::config::Settings;
use ttrl_serve::eval::client::Client;
use ttrl_serve::eval::data::BUILTIN;
use ttrl_serve::eval::results::Results;
use ttrl_serve::eval::{self, Arm, EvalOptions, Protocol};

use super::ModelArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// A JSONL file of questions, or a built-in set: gsm8k, math500, arc-easy.
    #[arg(long)]
    data: String,
    /// Folder for results.json, results.md and the charts; rerunning resumes from it.
    #[arg(long, default_value = "eval-results")]
    out: PathBuf,
    /// An OpenAI-compatible server to evaluate instead of one in this process (adapted arms
    /// need ttrl-serve).
    #[arg(long)]
    against: Option<String>,
    /// Bearer token for `--against`.
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Settings for the in-process server (see configs/default.toml).
    #[arg(long, env = "TTRL_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// online: each question once with ephemeral adaptation, in concurrent waves of --batch;
    /// transductive: a named adapter adapts on all questions for --episodes passes, then
    /// answers them; heldout: adapts on the first half, answers the second.
    #[arg(long, default_value = "transductive")]
    protocol: String,
    /// Comma-separated: base, spine-tree, spine-flat, ttrl-tree, ttrl-flat, answer-tree,
    /// answer-flat.
    #[arg(long, default_value = "base,spine-tree,spine-flat,ttrl-tree,ttrl-flat")]
    arms: String,
    /// Adaptation passes over the data, each followed by an evaluation.
    #[arg(long, default_value_t = 1)]
    episodes: usize,
    /// Samples per question for pass@1 and maj@k.
    #[arg(long, default_value_t = 8)]
    k: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Questions per adaptation batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Leaves voted on per question per adaptation step (default: the server's).
    #[arg(long)]
    samples: Option<usize>,
    /// Rollout + update rounds per adaptation batch (default: the server's).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N questions (before --limit).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Evaluation requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

impl EvalArgs {
    fn options(&self, rho: f32) -> Result<EvalOptions> {
        let arms = self
            .arms
            .split(',')
            .map(|name| {
                Arm::parse(name.trim()).with_context(|| {
                    let known: Vec<String> = Arm::ALL.iter().map(|a| a.name()).collect();
                    format!("unknown arm `{name}` ({})", known.join(", "))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let protocol = Protocol::parse(&self.protocol).with_context(|| {
            format!(
                "unknown protocol `{}` (online, transductive, heldout)",
                self.protocol
            )
        })?;
        anyhow::ensure!(self.k >= 1, "--k must be at least 1");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(
            self.samples.is_none_or(|n| n >= 2),
            "--samples must be at least 2"
        );
        let known = BUILTIN.map(|(name, _)| name);
        anyhow::ensure!(
            known.contains(&self.data.as_str()) || PathBuf::from(&self.data).is_file(),
            "--data `{}` is neither a file nor a built-in set ({})",
            self.data,
            known.join(", ")
        );
        Ok(EvalOptions {
            protocol,
            data: self.data.clone(),
            out: self.out.clone(),
            arms,
            episodes: self.episodes,
            k: self.k,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            batch: self.batch,
            samples: self.samples,
            steps: self.steps,
            seed: self.seed,
            skip: self.skip,
            limit: self.limit,
            concurrency: self.concurrency,
            rho,
        })
    }

    fn settings(&self) -> Result<Settings> {
        let mut s = self.model.settings(self.config.as_deref())?;
        // Adapters beside the results, so a resumed eval finds them.
        s.engine.data_dir = Some(self.out.join("adapters").display().to_string());
        // Each wave of --batch questions is one batch, whatever the machine's load: it closes
        // when its last question arrives, and a straggler has seconds, not 50 ms, to join it.
        s.adaptation.max_questions = self.batch;
        s.adaptation.batch_window_ms = s.adaptation.batch_window_ms.max(5_000);
        s.check()?;
        Ok(s)
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let results = match &args.against {
        Some(url) => {
            // A remote server's forking share is not visible over the API: assume the default.
            let options = args.options(AdaptConfig::default().rho)?;
            let client = Client::new(url, args.api_key.clone());
            let model = client.wait_for_model(Duration::from_secs(30))?;
            eval::run(&options, &client, &model)?
        }
        None => in_process(&args)?,
    };
    print!("{}", results.markdown());
    println!(
        "\nwrote {} and the charts in {}",
        args.out.join("results.json").display(),
        args.out.display()
    );
    Ok(())
}

fn in_process(args: &EvalArgs) -> Result<Results> {
    let settings = args.settings()?;
    let options = args.options(settings.adaptation.rho)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (state_tx, state_rx) = std::sync::mpsc::channel();
        let mut server = tokio::spawn(super::serve::serve_on(listener, settings, move |state| {
            let _ = state_tx.send(state);
            async {
                let _ = stopped.await;
            }
        }));
        let eval = tokio::task::spawn_blocking(move || {
            // Loading (or fetching) the weights comes first; wait on the state rather than
            // polling the API, which answers 503 until then.
            let state = state_rx.recv()?;
            while state.engine().is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let client = Client::new(&url, None);
            let model = client.wait_for_model(Duration::from_secs(30))?;
            eval::run(&options, &client, &model)
        });
        tokio::select! {
            served = &mut server => {
                served??;
                anyhow::bail!("the in-process server stopped before the eval finished")
            }
            outcome = eval => {
                let _ = stop.send(());
                server.await??;
                outcome?
            }
        }
    });
    // A failed start leaves the eval thread polling for the model; do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}
