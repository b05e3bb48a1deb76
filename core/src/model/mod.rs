//! herd's record-keeping vocabulary: the typed events (`events.rs`) and the
//! views folded from them (`views.rs`), with each job's row (`rows.rs`).
//!
//! These are facts about bookkeeping, not about training: a job has a kind,
//! inputs, hyperparameters and outputs, but what a kind *means* lives in the
//! daemon.

mod events;
mod lineage;
mod rows;
mod views;

pub use events::*;
pub use rows::*;
pub use views::*;
