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
pub mod chat_files;
pub mod chat_setup;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod grpo;
pub mod lora;
pub mod loss;
pub mod model;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod shared_prompt;
pub mod template;
pub mod train;

pub use config::LlamaConfig;
pub use error::{EngineError, Result};
pub use model::Llama;

/// Recorded with every job: the crate version plus a hash of the engine's
/// and the vendored candle-core's sources (build.rs), so any kernel change
/// shows up as a different engine version.
pub const ENGINE_VERSION: &str = concat!(
    "herd-engine/",
    env!("CARGO_PKG_VERSION"),
    "+src.",
    env!("HERD_ENGINE_SOURCE_HASH")
);

pub use fused::kernel_path;

/// Everything about the build and the machine that can change a job's
/// numbers: the engine version (with its source hash), the CPU kernel path
/// taken, threads, device and CUDA version. Recorded with each job;
/// `herd reproduce` compares it first.
pub fn fingerprint(device: &str, threads: usize) -> std::collections::BTreeMap<String, String> {
    let mut f = std::collections::BTreeMap::new();
    f.insert("engine_version".into(), ENGINE_VERSION.to_string());
    f.insert("kernel_path".into(), kernel_path().to_string());
    f.insert("threads".into(), threads.to_string());
    f.insert("device".into(), device.to_string());
    f.insert("arch".into(), std::env::consts::ARCH.to_string());
    if device.starts_with("cuda") {
        f.insert(
            "cuda".into(),
            device::cuda_version().unwrap_or_else(|| "unknown".into()),
        );
    }
    f
}
