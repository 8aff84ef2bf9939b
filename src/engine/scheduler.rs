//! The engine loop: the only owner of the model and its adapters. Between decode steps it
//! takes commands, closes adaptation batches and hands their episodes to the trainer,
//! installs the weights that come back, admits queued jobs (continuous batching) and frees
//! the sequences of jobs whose client left. Each step advances every running sequence by one
//! token, every adapter in one forward. Serving never waits for an episode.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::adaptation::{EpisodeQueue, InFlight, PendingBatch};
use super::admission::{adapters_in_use, Load, Queued};
use super::faults::{Fault, Faults};
use super::job::{EngineError, Event};
use super::prompt_cache::PromptCache;
use super::registry::{AdapterInfo, Registry};
use super::stream::Active;
use super::trainer::{panic_message, EpisodeDone, Trainer};
use super::{DeathWatch, EngineConfig};
use crate::generation::{decode_step_mixed, FinishReason, Sequence};
use crate::model::memory::{device_label, kv_bytes_per_token};
use crate::model::{Model, TextTokenizer};
use crate::telemetry as m;

pub enum Command {
    Generate(Box<Queued>),
    Admin(AdminCommand),
    /// The trainer finished an episode.
    EpisodeDone(Box<EpisodeDone>),
    /// Fail what has not started, cancel the episode, finish decoding within `grace`.
    Shutdown {
        grace: Duration,
    },
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T, EngineError>>;

/// Adapter management, each with its reply channel.
pub enum AdminCommand {
    List(tokio::sync::oneshot::Sender<Vec<AdapterInfo>>),
    /// A fresh adapter as the next version, saved.
    Reset(String, Reply<AdapterInfo>),
    /// Saves the adapter and returns the folder holding its PEFT files.
    Export(String, Reply<crate::adapt::store::AdapterFiles>),
    /// Loads PEFT files from a folder as the named adapter's next version, saved.
    Import(String, std::path::PathBuf, Reply<AdapterInfo>),
    /// Publishes a stored version's weights as the adapter's next version.
    Rollback(String, u64, Reply<AdapterInfo>),
}

/// How often the loop looks at its clients and the trainer when nothing decodes.
const IDLE_POLL: Duration = Duration::from_millis(100);

pub struct Scheduler {
    /// First field, so it drops first: if the loop panics, the engine is marked dead before
    /// its jobs' channels close and their clients see the error.
    _watch: DeathWatch,
    pub(super) model: Arc<Model>,
    pub(super) tokenizer: Arc<TextTokenizer>,
    pub(super) model_label: String,
    pub(super) max_batch: usize,
    pub(super) kv_cache_positions: Option<usize>,
    pub(super) load: Arc<Load>,
    pub(super) waiting: VecDeque<Queued>,
    pub(super) running: Vec<Active>,
    pub(super) pending: Vec<PendingBatch>,
    pub(super) episodes: EpisodeQueue,
    pub(super) in_flight: Option<InFlight>,
    pub(super) trainer: Trainer,
    pub(super) adapters: Registry,
    pub(super) faults: Faults,
    /// Ephemeral episodes so far (names their adapters).
    pub(super) episode_count: u64,
    /// Highest memory use above an episode's start, over all episodes.
    pub(super) adaptation_peak: u64,
    /// Set by a shutdown: when the loop stops, whatever still runs is aborted.
    deadline: Option<Instant>,
    pub(super) prompt_cache: PromptCache,
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        model_label: String,
        config: EngineConfig,
        watch: DeathWatch,
        adapters: Registry,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        metrics::gauge!(m::GPU_MEMORY, "kind" => "weights", "device" => device_label(model.device()))
            .set(model.weight_bytes() as f64);
        let per_position = kv_bytes_per_token(model.config(), model.dtype());
        let prompt_cache = PromptCache::new(config.kv_cache_positions.map(|p| p * per_position));
        let model = Arc::new(model);
        let trainer = Trainer::start(
            model.clone(),
            tokenizer.clone(),
            config.trainer_nice,
            move |done| {
                let _ = commands.send(Command::EpisodeDone(Box::new(done)));
            },
        );
        Self {
            load: watch.load.clone(),
            _watch: watch,
            model,
            tokenizer,
            model_label,
            max_batch: config.max_batch.max(1),
            kv_cache_positions: config.kv_cache_positions,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending: Vec::new(),
            episodes: EpisodeQueue::default(),
            in_flight: None,
            trainer,
            adapters,
            faults: config.faults,
            episode_count: 0,
            adaptation_peak: 0,
            deadline: None,
            prompt_cache,
        }
    }

    /// Runs until the command channel closes, or a shutdown's work is done or its grace
    /// period is over.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.deadline.is_some() && self.in_flight.is_none() {
                    break;
                }
                // Nothing to decode: sleep until a command, a batch window closing, or (with
                // an episode out) the next look at its clients.
                let wake = self.next_window_close().or_else(|| {
                    (self.in_flight.is_some() || self.deadline.is_some())
                        .then(|| Instant::now() + IDLE_POLL)
                });
                let received = match wake {
                    Some(at) => commands.recv_timeout(at.saturating_duration_since(Instant::now())),
                    None => commands
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok(cmd) => self.accept(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                self.accept(cmd);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            self.drop_cancelled();
            self.close_due_batches();
            self.start_next_episode();
            self.admit();
            self.step();
            self.publish_load();
        }
        self.abort_all();
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(queued) if self.deadline.is_some() => {
                queued.fail(EngineError::Unavailable(
                    "the server is shutting down".into(),
                ));
            }
            Command::Generate(queued) => {
                if queued.job.adaptation.is_some() {
                    self.add_to_batch(*queued);
                } else {
                    self.waiting.push_back(*queued);
                }
            }
            Command::Admin(cmd) => self.admin(cmd),
            Command::EpisodeDone(done) => self.finish_episode(*done),
            Command::Shutdown { grace } => {
                self.deadline = Some(Instant::now() + grace);
                self.stop_adaptation();
            }
        }
    }

    fn admin(&mut self, cmd: AdminCommand) {
        match cmd {
            AdminCommand::List(reply) => {
                let _ = reply.send(self.adapters.list());
            }
            AdminCommand::Reset(name, reply) => {
                let in_use = adapters_in_use(&self.running);
                let result = self.adapters.reset(&name, &self.model, &in_use);
                self.weights_changed(&name);
                let _ = reply.send(result);
            }
            AdminCommand::Import(name, dir, reply) => {
                let in_use = adapters_in_use(&self.running);
                let result = self.adapters.import(&name, &dir, &self.model, &in_use);
                self.weights_changed(&name);
                let _ = reply.send(result);
            }
            AdminCommand::Rollback(name, version, reply) => {
                let in_use = adapters_in_use(&self.running);
                let result = self.adapters.rollback(&name, version, &self.model, &in_use);
                self.weights_changed(&name);
                let _ = reply.send(result);
            }
            AdminCommand::Export(name, reply) => {
                let _ = reply.send(self.adapters.export(&name));
            }
        }
    }

    /// The adapter's weights changed: sequences decoding with it recompute their caches, so
    /// no KV computed under one weight version is used under another.
    pub(super) fn weights_changed(&mut self, adapter: &str) {
        self.prompt_cache.forget(adapter);
        for a in self
            .running
            .iter_mut()
            .filter(|a| a.job.adapter.as_deref() == Some(adapter))
        {
            for s in &mut a.seqs {
                s.reset_cache(&self.model);
            }
        }
    }

    /// One decode step for every running job, all adapters in one forward. A step that
    /// fails or panics is retried job by job (caches recomputed), so only the jobs that fail
    /// alone are failed.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        if self
            .running
            .iter()
            .any(|a| a.fault == Some(Fault::KillEngine))
        {
            panic!("injected engine failure (engine.test_exit_marker)");
        }
        let mut failed: Vec<(usize, EngineError)> = Vec::new();
        if self.decode(None).is_err() {
            for i in 0..self.running.len() {
                for s in &mut self.running[i].seqs {
                    s.reset_cache(&self.model);
                }
                if let Err(e) = self.decode(Some(i)) {
                    tracing::error!("decode step failed: {e}");
                    failed.push((i, e));
                }
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let _ = self.running.remove(i).job.events.send(Event::Error(e));
        }
        self.remember_prompts();
        self.finish_jobs();
    }

    /// Decodes every running job (or only job `only`) by one token, each with its adapter.
    fn decode(&mut self, only: Option<usize>) -> Result<(), EngineError> {
        let registry = &self.adapters;
        let mut batch: Vec<&mut Sequence> = Vec::new();
        let mut loras = Vec::new();
        let mut inject = false;
        for (i, a) in self.running.iter_mut().enumerate() {
            if only.is_none_or(|o| o == i) {
                inject |= a.fault == Some(Fault::PanicInJob);
                let lora = a.job.adapter.as_deref().and_then(|k| registry.serving(k));
                for s in &mut a.seqs {
                    batch.push(s);
                    loras.push(lora);
                }
            }
        }
        let (model, tokenizer) = (&self.model, &self.tokenizer);
        let result = catch_unwind(AssertUnwindSafe(|| {
            if inject {
                panic!("injected panic (engine.test_panic_marker)");
            }
            decode_step_mixed(model, tokenizer, &mut batch, &loras)
        }));
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EngineError::Internal(format!("decoding failed: {e}"))),
            Err(panic) => Err(EngineError::Internal(format!(
                "the engine panicked while decoding: {}",
                panic_message(&*panic)
            ))),
        }
    }

    /// Sends new tokens; records and drops jobs that have finished. A finished job's metrics
    /// are recorded before its last event goes out, so a client that reads /metrics right
    /// after its answer sees itself counted.
    fn finish_jobs(&mut self) {
        for a in &mut self.running {
            if a.is_done() && !a.job.events.is_closed() {
                let _enter = a.job.span.enter();
                let label = self.model_label.clone();
                let elapsed = a.job.arrived.elapsed();
                self.load.record_request(elapsed.as_millis() as u64);
                metrics::histogram!(m::E2E_REQUEST_LATENCY, "model" => label.clone())
                    .record(elapsed.as_secs_f64());
                let reason = a
                    .seqs
                    .iter()
                    .filter_map(Sequence::finish_reason)
                    .next_back()
                    .unwrap_or(FinishReason::Stop);
                metrics::counter!(m::REQUEST_SUCCESS, "model" => label, "finished_reason" => reason.as_str())
                    .increment(1);
            }
            a.emit(&self.model_label);
        }
        self.running.retain(|a| !a.is_done());
        // Ephemeral adapters go when the last job answered with them has finished.
        let in_use: Vec<&str> = self
            .running
            .iter()
            .map(|a| &a.job)
            .chain(self.waiting.iter().map(|q| &q.job))
            .filter_map(|j| j.adapter.as_deref())
            .collect();
        self.adapters.drop_unused_ephemeral(&in_use);
    }

    fn abort_all(&mut self) {
        for a in &mut self.running {
            for s in &mut a.seqs {
                s.abort();
            }
            a.emit(&self.model_label);
        }
        self.running.clear();
        self.abort_adaptation();
        for queued in self.waiting.drain(..) {
            queued.fail(EngineError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        self.publish_load();
    }
}
