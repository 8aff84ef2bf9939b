//! The engine: the single owner of the model. A cheap `Clone` handle sends commands to one
//! thread that owns the weights and adapters and schedules generation (continuous batching);
//! adaptation episodes run on a trainer thread beside it, and the new weights are installed
//! between two decode steps, so serving never waits for learning.

mod adaptation;
mod admission;
mod faults;
mod job;
mod prompt_cache;
mod registry;
mod scheduler;
mod stream;
mod trainer;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub use faults::Faults;
pub use job::{AdaptRequest, AdaptationReport, EngineError, Event, GenerateJob, TreeLeaf};
pub use registry::{AdapterCaps, AdapterInfo};

use crate::adapt::store::{AdapterFiles, AdapterStore};
use crate::adapt::AdaptConfig;
use crate::model::{Model, TextTokenizer};
use admission::{Load, Queued};
use registry::Registry;
use scheduler::{AdminCommand, Command, Scheduler};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step; rollouts decode at most this many at once.
    pub max_batch: usize,
    /// Jobs allowed to queue for a slot; one more is refused (HTTP 429).
    pub max_waiting: usize,
    /// KV-cache positions the running sequences (and an episode's rollouts) may reserve
    /// (prompt + max_tokens each); a job that would go over waits. `None`: bounded by
    /// `max_batch` only.
    pub kv_cache_positions: Option<usize>,
    /// Nice value of the trainer's threads.
    pub trainer_nice: i32,
    pub adapter_caps: AdapterCaps,
    /// How long a named adapter's version is trusted before the store is asked again
    /// (another replica may have published a newer one).
    pub adapter_refresh: std::time::Duration,
    pub faults: Faults,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({waiting} requests waiting)")]
    QueueFull { waiting: usize, retry_after: u64 },
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    load: Arc<Load>,
    max_waiting: usize,
    max_batch: usize,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    died: tokio::sync::watch::Receiver<bool>,
}

/// Marks the engine dead if its thread unwinds (a panic outside any job).
pub struct DeathWatch {
    load: Arc<Load>,
    died: tokio::sync::watch::Sender<bool>,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.load.alive.store(false, Ordering::SeqCst);
            let _ = self.died.send(true);
        }
    }
}

impl Engine {
    /// Starts the engine thread; it owns `model` (and every adapter in `store`) from here on.
    pub fn start(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        model_label: String,
        config: EngineConfig,
        store: Option<Box<dyn AdapterStore>>,
        adapt_defaults: AdaptConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let (died_tx, died) = tokio::sync::watch::channel(false);
        let watch = DeathWatch {
            load: load.clone(),
            died: died_tx,
        };
        let (max_waiting, max_batch) = (config.max_waiting, config.max_batch);
        let commands = tx.clone();
        let thread = std::thread::Builder::new()
            .name("ttrl-engine".into())
            .spawn(move || {
                let adapters = Registry::load(
                    &model,
                    model_label.clone(),
                    store,
                    adapt_defaults,
                    config.adapter_caps.clone(),
                    config.adapter_refresh,
                );
                Scheduler::new(
                    model,
                    tokenizer,
                    model_label,
                    config,
                    watch,
                    adapters,
                    commands,
                )
                .run(rx)
            })
            .expect("spawning the engine thread");
        Self {
            commands: tx,
            load,
            max_waiting,
            max_batch,
            thread: Arc::new(Mutex::new(Some(thread))),
            died,
        }
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: GenerateJob) -> Result<(), SubmitError> {
        let slot = self
            .load
            .enter(self.max_waiting)
            .map_err(|waiting| SubmitError::QueueFull {
                waiting,
                retry_after: self.load.retry_after_seconds(self.max_batch),
            })?;
        self.commands
            .send(Command::Generate(Box::new(Queued { job, _slot: slot })))
            .map_err(|_| SubmitError::Stopped)
    }

    /// False once the engine thread has died; the server then reports 503 and exits.
    pub fn is_alive(&self) -> bool {
        self.load.alive.load(Ordering::SeqCst)
    }

    /// Resolves if the engine thread dies (never, if it stops normally).
    pub async fn died(&self) {
        let mut died = self.died.clone();
        if died.wait_for(|&d| d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> AdminCommand,
    ) -> Result<T, SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Admin(make(tx)))
            .map_err(|_| SubmitError::Stopped)?;
        rx.await.map_err(|_| SubmitError::Stopped)
    }

    pub async fn adapters(&self) -> Result<Vec<AdapterInfo>, SubmitError> {
        self.ask(AdminCommand::List).await
    }

    pub async fn reset_adapter(
        &self,
        name: String,
    ) -> Result<Result<AdapterInfo, EngineError>, SubmitError> {
        self.ask(|tx| AdminCommand::Reset(name, tx)).await
    }

    pub async fn export_adapter(
        &self,
        name: String,
    ) -> Result<Result<AdapterFiles, EngineError>, SubmitError> {
        self.ask(|tx| AdminCommand::Export(name, tx)).await
    }

    pub async fn import_adapter(
        &self,
        name: String,
        dir: PathBuf,
    ) -> Result<Result<AdapterInfo, EngineError>, SubmitError> {
        self.ask(|tx| AdminCommand::Import(name, dir, tx)).await
    }

    pub async fn rollback_adapter(
        &self,
        name: String,
        version: u64,
    ) -> Result<Result<AdapterInfo, EngineError>, SubmitError> {
        self.ask(|tx| AdminCommand::Rollback(name, version, tx))
            .await
    }

    /// Fails work that has not started, cancels the episode in flight, lets decoding finish
    /// within `grace`, aborts the rest, and waits for the thread.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.commands.send(Command::Shutdown { grace });
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
