//! What the server hands the engine, and what the engine streams back. A job carries its
//! own reply channel, so handlers never touch the model.

use std::time::Instant;

use tokio::sync::mpsc;

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
    pub events: mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
    pub span: tracing::Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
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
    Error(String),
}
