//! The model runtime: one differentiable decoder for generation and training, LoRA adapters
//! beside frozen weights, the KV cache, loaders and the tokenizer with its chat template.
//! Nothing here knows about HTTP, scheduling or rewards.

pub mod assets;
pub mod config;
pub mod decoder;
pub mod frozen;
pub mod kv_cache;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod ops;
pub mod tokenizer;

pub use config::{Family, ModelConfig, RopeLayout};
pub use decoder::{LogitsFor, Model, SeqInput, WeightSource};
pub use kv_cache::KvCache;
pub use loader::{LoadedModel, ModelSource};
pub use lora::{Adapter, LoraConfig, Projection};
pub use tokenizer::{ChatMessage, IncrementalDecoder, TextTokenizer};
