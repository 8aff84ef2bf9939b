//! The engine: the single owner of the model. A cheap `Clone` handle sends commands to one
//! thread that owns the weights and adapters, schedules generation (continuous batching)
//! and adaptation, and is the only place where weights change.

mod job;
mod scheduler;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub use job::{AdaptRequest, AdaptationReport, Event, GenerateJob, TreeLeaf};
pub use scheduler::AdapterInfo;

use crate::adapt::store::AdapterStore;
use crate::adapt::AdaptConfig;
use crate::model::{Model, TextTokenizer};
use scheduler::{AdminCommand, Command, Load, Scheduler};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Jobs allowed to queue for a slot; one more is refused (HTTP 429).
    pub max_waiting: usize,
    /// KV-cache positions the running sequences may reserve (prompt + max_tokens each); a
    /// job that would go over waits. `None`: bounded by `max_batch` only.
    pub kv_cache_positions: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    load: Arc<Load>,
    max_waiting: usize,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
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
        let shared = load.clone();
        let thread = std::thread::Builder::new()
            .name("ttrl-engine".into())
            .spawn(move || {
                Scheduler::new(
                    model,
                    tokenizer,
                    model_label,
                    config,
                    shared,
                    store,
                    adapt_defaults,
                )
                .run(rx)
            })
            .expect("spawning the engine thread");
        Self {
            commands: tx,
            load,
            max_waiting: config.max_waiting,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: GenerateJob) -> Result<(), SubmitError> {
        let waiting = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        self.commands
            .send(Command::Generate(Box::new(job)))
            .map_err(|_| {
                self.load.waiting.fetch_sub(1, Ordering::SeqCst);
                SubmitError::Stopped
            })
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
    ) -> Result<crate::Result<AdapterInfo>, SubmitError> {
        self.ask(|tx| AdminCommand::Reset(name, tx)).await
    }

    pub async fn export_adapter(
        &self,
        name: String,
    ) -> Result<crate::Result<PathBuf>, SubmitError> {
        self.ask(|tx| AdminCommand::Export(name, tx)).await
    }

    pub async fn import_adapter(
        &self,
        name: String,
        dir: PathBuf,
    ) -> Result<crate::Result<AdapterInfo>, SubmitError> {
        self.ask(|tx| AdminCommand::Import(name, dir, tx)).await
    }

    /// Lets in-flight work finish within `grace`, aborts the rest, and waits for the thread.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.commands.send(Command::Shutdown { grace });
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
