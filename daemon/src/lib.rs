//! herdd: the daemon that wires the store and the engine together.
//!
//! * [`data`]: datasets users bring (JSONL), parsed strictly.
//! * [`jobs`]: the Llama 3 recipes as jobs (rm, sample, sft, dpo, average,
//!   curate, eval, annotate).
//! * [`task`]: the checkable task behind simulated annotation and eval.

pub mod data;
pub mod jobs;
pub mod task;
