//! Adaptation: advantages, the SPINE/TTRL objective, the optimizer and the episode that
//! ties rollouts, votes and updates together. Only LoRA tensors are handed to the optimizer.

pub mod advantage;
pub mod config;
pub mod episode;
pub mod objective;
pub mod optim;
pub mod store;

pub use config::{AdaptConfig, Method};
pub use episode::{
    run_episode, EpisodeLimits, EpisodeReport, Learner, Question, QuestionOutcome, Reversed,
    StepReport,
};
pub use optim::{AdamW, AdamWConfig, StepStats};
