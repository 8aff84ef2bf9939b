//! The engine: the single owner of the model. It schedules generation (and, later,
//! adaptation) and is the only place where weights change.

pub mod sequence;

pub use sequence::{decode_step, FinishReason, Sequence, StopRules};
