//! herd's training engine: a Llama that trains correctly in candle.
//!
//! * [`model`]: the model in one file (GQA, RoPE incl. Llama 3 scaling,
//!   RMSNorm, SwiGLU, tied/untied embeddings, LM or reward head).
//! * [`ops`]: differentiable ops (candle-nn's fused ones have no backward).
//! * [`batch`]: rows, packing and attention masks.
//! * [`chat`]: the Llama 3 chat format with target and format masks.
//! * [`loss`]: SFT, DPO(+NLL), Bradley-Terry RM losses.
//! * [`optim`]: AdamW (torch semantics), schedules, clipping.
//! * [`generate`]: batched KV-cache generation.
//! * [`average`], [`checkpoint`], [`device`], [`rng`].
//!
//! The engine knows nothing of HTTP or the store.

pub mod average;
pub mod batch;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod fused;
pub mod generate;
pub mod loss;
pub mod model;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod train;

pub use config::LlamaConfig;
pub use error::{EngineError, Result};
pub use model::Llama;

/// Recorded with every job: results are reproducible for the same version.
pub const ENGINE_VERSION: &str = concat!("herd-engine/", env!("CARGO_PKG_VERSION"));
