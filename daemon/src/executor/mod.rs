//! Where workers run. The scheduler decides *which* job runs *when*; an
//! executor decides *where*, and owns everything that depends on it: how a
//! worker is started, how its messages reach the daemon, how it is stopped,
//! what its platform's states mean, whether its jobs outlive the daemon
//! (and how to find them again), and what to check at start-up.
//!
//! * [`local`]: child processes of the daemon, one per device slot.
//! * [`slurm`]: `sbatch` jobs on a cluster that shares the data directory.
//!
//! A new executor is one file implementing [`Executor`] (the tests' own
//! in-process executor is one), plus a line in [`stop_elsewhere`] if its
//! jobs outlive the daemon that started them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::Result;
pub use herd_core::model::ExecutorHandle;
use herd_core::model::JobView;

pub mod local;
pub mod slurm;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The device and threads a job's worker gets.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: String,
    pub threads: usize,
}

/// One attempt to start: its job file is written, its work directory fresh.
pub struct Launch<'a> {
    pub job: &'a JobView,
    /// The attempt number (1 for the first).
    pub attempt: u32,
    pub job_file: PathBuf,
    pub workdir: PathBuf,
    pub placement: Placement,
}

/// A started attempt: its handle (recorded in `JobStarted`) and its messages.
pub struct Started {
    pub handle: ExecutorHandle,
    /// The worker's process id, when it is a child of this daemon.
    pub pid: Option<u32>,
    pub follow: Box<dyn Follow>,
}

/// How an attempt ended, as its executor saw it.
#[derive(Debug, Clone)]
pub enum Ending {
    /// The worker ended; `how` says how when it reported no result itself.
    Ended { ok: bool, how: String },
    /// Ended by the platform for its own reason (time limit, memory, a
    /// cancel from outside herd).
    EndedBy(String),
    /// Lost through no fault of the job (a node failed): run it again
    /// while attempts are left.
    Lost(String),
}

/// What following an attempt gives next.
pub enum Next {
    /// One line the worker wrote (a `WorkerMessage`, or anything it said).
    Line(String),
    /// The attempt is over; every line it wrote came before this.
    Ended(Ending),
}

/// One running attempt's messages and its stop switch.
pub trait Follow: Send {
    /// The worker's next line, or how the attempt ended.
    fn next(&mut self) -> BoxFuture<'_, Result<Next>>;
    /// Ask the attempt to stop (a cancel, or a daemon shutting down whose
    /// executor's jobs die with it); `next` then reports its ending.
    fn stop(&mut self) -> BoxFuture<'_, ()>;
}

pub trait Executor: Send + Sync {
    /// Its name: in `JobStarted.executor`, `/status` and the dashboard.
    fn name(&self) -> &'static str;

    /// The slots jobs are scheduled on: one per device, or one per job in
    /// flight on a cluster. `/status` lists them.
    fn slots(&self) -> Vec<String>;

    /// The device and threads a job gets on `slot`.
    fn placement(&self, job: &JobView, slot: usize) -> Placement;

    /// Start the worker; returns once it is running (or queued where it runs).
    fn start<'a>(&'a self, launch: Launch<'a>) -> BoxFuture<'a, Result<Started>>;

    /// Whether attempts run on when the daemon stops: then a restarted
    /// daemon re-attaches to them instead of requeueing them.
    fn survives_restart(&self) -> bool {
        false
    }

    /// Follow an attempt a previous daemon started (its work directory is
    /// `workdir`), from its first message: the scheduler records only what
    /// the log lacks. Only asked of executors whose jobs survive a restart.
    fn reattach<'a>(
        &'a self,
        job: &'a JobView,
        handle: &'a ExecutorHandle,
        workdir: PathBuf,
    ) -> BoxFuture<'a, Result<Box<dyn Follow>>> {
        let _ = (job, workdir);
        Box::pin(async move {
            anyhow::bail!(
                "executor {} cannot re-attach to {handle}: its jobs end with the daemon",
                self.name()
            )
        })
    }

    /// Checked once at start, before any job: that workers can run there
    /// and see the data directory. What it found, in words.
    fn probe<'a>(&'a self, data_dir: &'a std::path::Path) -> BoxFuture<'a, Result<Option<String>>> {
        let _ = data_dir;
        Box::pin(async { Ok(None) })
    }
}

/// Stop an attempt started by an executor this daemon no longer runs (it
/// was restarted with another `--executor`); what was done, in words. The
/// one place that names executors whose jobs outlive their daemon.
pub fn stop_elsewhere(handle: &ExecutorHandle) -> String {
    let stopped = match handle.executor.as_str() {
        "slurm" => slurm::stop_by_handle(handle),
        "local" => Ok(format!(
            "process {} ended with the daemon that started it",
            handle.id
        )),
        other => Err(anyhow::anyhow!(
            "this herd has no executor `{other}` to stop it"
        )),
    };
    stopped.unwrap_or_else(|e| format!("could not stop {handle}: {e:#}"))
}
