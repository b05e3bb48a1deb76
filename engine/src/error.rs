//! Engine errors: each says what went wrong and where (file, field, step).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{file}: field `{field}`: {reason}")]
    Config {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("non-finite loss ({value}) at step {step}")]
    NonFinite { step: u64, value: f64 },
    #[error("parameter `{0}` received no gradient: the graph is cut somewhere (a fused op without backward?)")]
    NoGradient(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    pub fn config(file: &str, field: &str, reason: impl Into<String>) -> Self {
        EngineError::Config {
            file: file.to_string(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }
    pub fn checkpoint(path: &Path, reason: impl Into<String>) -> Self {
        EngineError::Checkpoint {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
