//! What the server hands the engine, and what the engine streams back. A job carries its
//! own reply channel, so handlers never touch the model.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::adapt::{AdaptConfig, Question, StepReport};
use crate::generation::{FinishReason, StopRules};
use crate::sampling::{SampledToken, Sampling};

/// A validated generation request.
#[derive(Debug)]
pub struct GenerateJob {
    pub prompt: Vec<u32>,
    /// Choices to generate; choice i samples with seed `seed + i`.
    pub n: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub rules: StopRules,
    pub top_logprobs: usize,
    /// A named adapter to answer with; `None` is the base model.
    pub adapter: Option<String>,
    /// Adapt on this question (with the others of its batch) before answering.
    pub adaptation: Option<AdaptRequest>,
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
    pub span: tracing::Span,
}

#[derive(Debug, Clone)]
pub struct AdaptRequest {
    pub question: Question,
    /// The server's defaults with this request's overrides applied.
    pub config: AdaptConfig,
    /// Persistent named adapter; `None` adapts an ephemeral one, dropped after the batch.
    pub adapter: Option<String>,
}

impl AdaptRequest {
    /// Requests batch together only when they would run the same episode.
    pub fn batch_key(&self) -> String {
        let c = &self.config;
        format!(
            "{:?}|{:?}|{:?}|{}|{}",
            self.adapter, c.method, c.rollout, c.samples, c.steps
        )
    }
}

/// What an episode says to one of its requests (the server turns it into the wire report).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptationReport {
    pub applied: bool,
    pub method: &'static str,
    pub rollout: &'static str,
    pub adapter: Option<String>,
    /// Version before the episode and after it.
    pub adapter_version_before: u64,
    pub adapter_version: u64,
    pub steps: usize,
    pub rollouts: usize,
    pub rollout_tokens: usize,
    pub flat_equivalent_tokens: usize,
    pub majority_answer: Option<String>,
    pub vote_share: f32,
    pub votes: Vec<(String, usize)>,
    pub forking_fraction: f32,
    pub mean_entropy: f32,
    pub loss: f32,
    pub kl: f32,
    pub duration_ms: u64,
    pub rolled_back: bool,
    pub note: Option<String>,
    /// Why this question did not train (no real majority, every leaf agreeing), if it did not.
    pub no_signal: Option<String>,
    /// This question's leaves that hit the rollout budget and abstained.
    pub truncated_leaves: usize,
    pub batch_questions: usize,
    pub step_metrics: Vec<StepReport>,
    /// This question's leaves of the last step.
    pub tree: Vec<TreeLeaf>,
}

/// One leaf for the tree view: tokens with their entropies, and where it forked.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeLeaf {
    /// Index (within this question's leaves) of the root it branched from, and the position.
    pub parent: Option<usize>,
    pub fork_at: Option<usize>,
    pub tokens: Vec<String>,
    pub entropies: Vec<f32>,
    pub answer: Option<String>,
    pub reward: f32,
    /// Cut off by the rollout budget: out of the vote and the loss.
    pub truncated: bool,
    /// It answered the question with its options in reverse order; `answer` names the
    /// option as the question lists it.
    pub options_reversed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The adaptation episode ran; sent before any token.
    Adapted(Box<AdaptationReport>),
    /// One generated token of choice `index` and the text it released (may be empty while
    /// a possible stop string is held back).
    Token {
        index: usize,
        token: SampledToken,
        text: String,
    },
    /// Choice `index` ended; `text` is any held-back text released at the end.
    Finished {
        index: usize,
        reason: FinishReason,
        text: String,
        completion_tokens: usize,
    },
    /// The engine failed this job; no more events follow.
    Error(EngineError),
}

/// Why the engine could not serve a job (or an admin command), typed so the server maps each
/// to one HTTP status: unknown adapter 404, never fits 400, stopping 503, a bug 500.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("adapter `{0}` does not exist")]
    AdapterNotFound(String),
    /// The request can never be served as asked (too big for the KV budget, a bad import).
    #[error("{0}")]
    Invalid(String),
    /// Creating or growing a named adapter would pass a cap; `cap` names the setting.
    #[error("{message}")]
    CapReached { cap: &'static str, message: String },
    /// The engine is stopping or stopped; retrying elsewhere may work.
    #[error("{0}")]
    Unavailable(String),
    /// A failure or panic inside the engine, confined to this job.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::Error> for EngineError {
    fn from(e: crate::Error) -> Self {
        // Errors may carry a backtrace; clients get the sentence.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().to_string();
        match e {
            crate::Error::Interrupted(_) => EngineError::Unavailable(first),
            crate::Error::Adapter { .. } | crate::Error::ShapeMismatch { .. } => {
                EngineError::Invalid(first)
            }
            _ => EngineError::Internal(first),
        }
    }
}
