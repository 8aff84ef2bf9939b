//! The engine: the single owner of the model. A cheap `Clone` handle sends commands to one
//! thread that owns the weights, schedules generation (continuous batching) and is the only
//! place where weights change.

mod job;
mod scheduler;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use job::{Event, GenerateJob};
pub use scheduler::Load;

use crate::model::{Model, TextTokenizer};
use scheduler::{Command, Scheduler};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Jobs allowed to queue for a slot; one more is refused (HTTP 429).
    pub max_waiting: usize,
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
    commands: mpsc::UnboundedSender<Command>,
    load: Arc<Load>,
    max_waiting: usize,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the engine thread; it owns `model` from here on.
    pub fn start(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        model_label: String,
        config: EngineConfig,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(Load::default());
        let scheduler = Scheduler::new(
            model,
            tokenizer,
            model_label,
            config.max_batch,
            load.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("ttrl-engine".into())
            .spawn(move || scheduler.run(rx))
            .expect("spawning the engine thread");
        Self {
            commands: tx,
            load,
            max_waiting: config.max_waiting,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        }
    }

    pub fn load(&self) -> &Load {
        &self.load
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: GenerateJob) -> Result<(), SubmitError> {
        let waiting = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        self.commands.send(Command::Generate(job)).map_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
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
