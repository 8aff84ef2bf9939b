//! The trainer: a worker thread that runs adaptation episodes while the engine loop keeps
//! decoding. It borrows the frozen base weights (shared, never written) and owns the learner
//! of the episode at hand; the engine installs what comes back between two decode steps.
//!
//! Its compute runs on a rayon pool of its own whose threads run at a lower OS priority
//! (`engine.trainer_nice`), so on a CPU the serving loop gets the cores first and training
//! takes what is left; on a GPU the two simply share the device.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::adapt::{run_episode, AdaptConfig, EpisodeLimits, EpisodeReport, Learner, Question};
use crate::model::{Model, TextTokenizer};

/// One episode to run.
pub struct EpisodeTask {
    pub learner: Learner,
    pub questions: Vec<Question>,
    pub config: AdaptConfig,
    pub seed: u64,
    pub limits: EpisodeLimits,
}

/// How an episode ended.
pub enum EpisodeOutcome {
    Finished(EpisodeReport),
    /// Stopped early or failed; the learner is as it was before the episode.
    Failed(crate::Error),
    /// The episode panicked; the learner is lost.
    Panicked(String),
}

pub struct EpisodeDone {
    /// `None` after a panic.
    pub learner: Option<Learner>,
    pub outcome: EpisodeOutcome,
    pub seconds: f64,
}

pub struct Trainer {
    tasks: mpsc::Sender<EpisodeTask>,
}

impl Trainer {
    /// Starts the worker; each finished episode goes to `done`.
    pub fn start(
        model: Arc<Model>,
        tokenizer: Arc<TextTokenizer>,
        nice: i32,
        done: impl Fn(EpisodeDone) + Send + 'static,
    ) -> Self {
        let (tasks, rx) = mpsc::channel::<EpisodeTask>();
        std::thread::Builder::new()
            .name("ttrl-trainer".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("ttrl-trainer-{i}"))
                    .start_handler(move |_| lower_priority(nice))
                    .build()
                    .expect("building the trainer's thread pool");
                lower_priority(nice);
                for task in rx {
                    done(pool.install(|| run(&model, &tokenizer, task)));
                }
            })
            .expect("spawning the trainer thread");
        Self { tasks }
    }

    /// Queues an episode; gives the task back if the worker is gone.
    pub fn submit(&self, task: EpisodeTask) -> Result<(), Box<EpisodeTask>> {
        self.tasks.send(task).map_err(|e| Box::new(e.0))
    }
}

fn run(model: &Model, tokenizer: &TextTokenizer, task: EpisodeTask) -> EpisodeDone {
    let started = Instant::now();
    let EpisodeTask {
        mut learner,
        questions,
        config,
        seed,
        limits,
    } = task;
    let result = catch_unwind(AssertUnwindSafe(|| {
        run_episode(
            model,
            tokenizer,
            &mut learner,
            &questions,
            &config,
            seed,
            &limits,
        )
    }));
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(Ok(report)) => EpisodeDone {
            learner: Some(learner),
            outcome: EpisodeOutcome::Finished(report),
            seconds,
        },
        Ok(Err(e)) => EpisodeDone {
            learner: Some(learner),
            outcome: EpisodeOutcome::Failed(e),
            seconds,
        },
        Err(panic) => EpisodeDone {
            learner: None,
            outcome: EpisodeOutcome::Panicked(panic_message(&*panic)),
            seconds,
        },
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Raises this thread's nice value (Linux: per thread). Best effort: a failure only costs
/// serving some latency, so it is logged, not fatal.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread's id; no memory is shared.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            tracing::warn!(
                "could not lower the trainer's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
