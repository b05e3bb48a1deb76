#![recursion_limit = "512"]
//! herdd: the daemon that wires the store and the engine together.
//!
//! * [`data`]: datasets users bring (JSONL), parsed strictly.
//! * [`jobs`]: the Llama 3 recipes as jobs (rm, sample, sft, dpo, average,
//!   curate, eval, annotate).
//! * [`task`]: the checkable task behind simulated annotation and eval.
//! * [`references`]: job inputs (`job:<id>/<output>` or a hash), parsed and kind-checked once.
//! * [`rounds`]: round specs expanded into job DAGs.
//! * [`state`]: store + live projection shared by the API and scheduler.
//! * [`scheduler`]: queue, slots, dependencies, following attempts, recovery.
//! * [`executor`]: where workers run (local processes, Slurm).
//! * [`worker`]: the worker process side of a job.
//! * [`api`]: the HTTP API (warp).
//! * [`listener`]: accepting connections: header timeout, connection limit.
//! * [`server`]: start, token, shutdown.
//! * [`repair`]: `herdd repair`, and the loss it records.

pub mod api;
pub mod dashboard;
pub mod data;
pub mod executor;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod references;
pub mod repair;
pub mod rounds;
pub mod scheduler;
pub mod server;
pub mod slurm;
pub mod state;
pub mod task;
pub mod verifiers;
pub mod views;
pub mod worker;
