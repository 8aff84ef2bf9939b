//! One integration binary (so the slow candle link happens once), one module per area.

mod common;

// Logits against HF transformers, the KV-cache path, GGUF and the tokenizers.
mod parity;
// LoRA gradients, finite differences, an optimizer step, LoRA off.
mod gradients;
// Seeds, batching, entropies, forks and trees on the batched decoder.
mod generation;
// Truncated files, unknown architectures, missing tokenizers.
mod bad_input;
// The real default model, fetched from the package registry.
mod real_model;
// The HTTP server: the openai SDK, batching, limits, shutdown, metrics, errors.
mod server;
// Serving beside learning: episodes off the decode loop, bounds, faults, shutdown.
mod beside_learning;
// Adapters survive kill -9, full disks, corrupt files and hostile imports.
mod durability;
// API keys, rights and tenants that own their adapters.
mod tenancy;
// Exported adapters in HF peft: the same logits.
mod interop;
// The OpenAPI document against the router and real responses.
mod openapi;
// Test-time adaptation over HTTP and in-process on the default model.
mod adaptation;
// Replicas sharing adapters in S3-compatible storage, behind HAProxy with adapter affinity.
mod scale_out;
// Answer equivalence against math-verify on MATH-500's answers.
mod reward;
// `ttrl-serve eval`: arms, files, resume, remote servers, bad rows.
mod eval;
