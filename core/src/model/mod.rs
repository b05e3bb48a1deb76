//! herd's record-keeping vocabulary: the typed events (`events.rs`) and the
//! views folded from them (`views.rs`).
//!
//! These are facts about bookkeeping, not about training: a job has a kind,
//! inputs, hyperparameters and outputs, but what a kind *means* lives in the
//! daemon.

mod events;
mod views;

pub use events::*;
pub use views::*;
