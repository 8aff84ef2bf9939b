//! ttrl-serve: an OpenAI-compatible inference server that can adapt LoRA weights to the
//! questions it is asked, by label-free test-time RL.
//!
//! Brief overview: [`model`] owns the differentiable decoder, LoRA adapters, KV caches,
//! loaders and the tokenizer; [`sampling`] turns logits into tokens with exact entropies;
//! [`engine`] runs batched decoding over [`generation::Sequence`]s. Data flows one way:
//! server → engine → model.

pub mod adapt;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generation;
pub mod interrupt;
pub mod model;
pub mod numerics;
pub mod reward;
pub mod rollout;
pub mod sampling;
pub mod server;
pub mod telemetry;

pub use error::{Error, Result};
