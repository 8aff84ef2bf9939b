//! Adaptation: the optimizer now; advantages, SPINE/TTRL losses and the adapter store
//! build on it. Only LoRA tensors are ever handed to the optimizer.

pub mod optim;

pub use optim::{AdamW, AdamWConfig, StepStats};
