//! The library's error type: one enum whose variants carry what went wrong, so the
//! server can map each to an HTTP status and the CLI can print a sentence that names the cause.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file not found: {path} ({what})")]
    MissingFile { path: PathBuf, what: &'static str },

    #[error(
        "unsupported architecture `{arch}`: ttrl-serve runs the llama, qwen2 and qwen3 families"
    )]
    UnsupportedArchitecture { arch: String },

    #[error("invalid model config: {0}")]
    InvalidConfig(String),

    #[error("tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },

    #[error("cannot read {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("download of `{id}` failed: {reason}")]
    Download { id: String, reason: String },

    #[error("adapter `{name}`: {reason}")]
    Adapter { name: String, reason: String },

    /// An adaptation episode stopped early (cancelled or out of time); nothing was applied.
    #[error("{0}")]
    Interrupted(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
