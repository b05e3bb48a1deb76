//! Puts queued jobs on slots: highest priority first, then submission
//! order; a job waits for the jobs it depends on and fails (with the
//! reason) if one of them failed. Where a started job's worker runs is its
//! executor's business (`crate::executor`): the scheduler never names one.
//!
//! * this file: the queue, the slots, starting an attempt, following it
//!   to its end, cancel and shutdown;
//! * `prepare.rs`: inputs resolved and materialized, the job file, the
//!   `JobStarted` record;
//! * `attempt.rs`: the worker-message fold and the event that ends it;
//! * `recovery.rs`: what a previous daemon left running.
//!
//! Dependencies stay herd's (not a cluster's): a job's inputs are resolved
//! to hashes and materialized before its job file is written, and a failed
//! dependency fails the job here with its reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use herd_core::model::{streams, HerdEvent, JobStatus, JobView};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::executor::local::LocalExecutor;
use crate::executor::slurm::SlurmExecutor;
use crate::executor::{Executor, Follow, Launch, Next};
use crate::slurm::SlurmConfig;
use crate::state::State;
use attempt::{Attempt, Outcome};

mod attempt;
mod prepare;
mod recovery;

#[derive(Clone)]
pub struct SchedulerConfig {
    /// Attempts a job gets when its worker is lost (daemon restarts, node
    /// failures) before it fails.
    pub max_attempts: u32,
    pub executor: Arc<dyn Executor>,
}

impl SchedulerConfig {
    /// Workers as child processes, one per device slot.
    pub fn local(worker_command: Vec<String>, devices: Vec<String>, cpu_threads: usize) -> Self {
        Self::with(Arc::new(LocalExecutor::new(
            worker_command,
            devices,
            cpu_threads,
        )))
    }

    /// CUDA devices when built with `cuda` and present, else `cpu_jobs` CPU
    /// slots, the cores shared between them.
    pub fn discover(worker_command: Vec<String>, cpu_jobs: usize) -> Self {
        let mut devices = herd_engine::device::cuda_devices();
        devices.extend(std::iter::repeat_n("cpu".to_string(), cpu_jobs.max(1)));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Self::local(worker_command, devices, (cores / cpu_jobs.max(1)).max(1))
    }

    /// Jobs go to Slurm, `slurm.max_in_flight` at a time.
    pub fn slurm(worker_command: Vec<String>, slurm: SlurmConfig) -> Self {
        Self::with(Arc::new(SlurmExecutor::new(worker_command, slurm)))
    }

    /// Any executor (the tests bring their own).
    pub fn with(executor: Arc<dyn Executor>) -> Self {
        SchedulerConfig {
            max_attempts: 3,
            executor,
        }
    }
}

impl std::fmt::Debug for SchedulerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerConfig")
            .field("max_attempts", &self.max_attempts)
            .field("executor", &self.executor.name())
            .field("slots", &self.executor.slots())
            .finish()
    }
}

/// What claiming a slot for a job found.
enum Claim {
    Slot(usize),
    /// No free slot.
    Full,
    /// The job has a running entry already (started, or being cancelled).
    Taken,
}

struct Running {
    kill: Option<oneshot::Sender<()>>,
    cancelled: bool,
    pid: Option<u32>,
}

impl Running {
    /// Held for a job with no worker to stop yet (starting, or having its
    /// cancel recorded).
    fn unarmed() -> Self {
        Running {
            kill: None,
            cancelled: false,
            pid: None,
        }
    }
}

pub struct Scheduler {
    state: Arc<State>,
    config: SchedulerConfig,
    slots: Mutex<Vec<Option<Uuid>>>,
    running: Mutex<HashMap<Uuid, Running>>,
    shutting_down: AtomicBool,
    /// Flipped once at shutdown: followers of jobs that outlive the daemon stop.
    shutdown_signal: watch::Sender<bool>,
}

impl Scheduler {
    pub fn new(state: Arc<State>, config: SchedulerConfig) -> Arc<Self> {
        let slots = Mutex::new(vec![None; config.executor.slots().len()]);
        Arc::new(Scheduler {
            state,
            config,
            slots,
            running: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            shutdown_signal: watch::channel(false).0,
        })
    }

    /// The executor's name: `local`, `slurm`, ...
    pub fn executor_name(&self) -> &'static str {
        self.config.executor.name()
    }

    pub fn devices(&self) -> Vec<String> {
        self.config.executor.slots()
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.clone().schedule_once().await {
                tracing::error!("scheduler: {e:#}");
            }
            tokio::select! {
                _ = self.state.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn schedule_once(self: Arc<Self>) -> Result<()> {
        let (queued, jobs) = {
            let p = self.state.projection.read().await;
            let mut q: Vec<JobView> = p
                .jobs
                .values()
                .filter(|j| j.status == JobStatus::Queued && j.kind.is_recipe())
                .cloned()
                .collect();
            q.sort_by_key(|j| (-j.priority, j.submitted_seq));
            // Only the jobs the queued ones depend on, not every job ever
            // recorded: this runs after every event that can unblock one.
            let mut related: BTreeMap<Uuid, JobView> = BTreeMap::new();
            for d in q.iter().flat_map(|j| j.depends_on.iter()) {
                if let Some(v) = p.job(*d)? {
                    related.insert(*d, v.into_owned());
                }
            }
            (q, related)
        };
        for job in queued {
            if self
                .running
                .lock()
                .expect("running lock")
                .contains_key(&job.id)
            {
                continue;
            }
            let mut waiting = false;
            let mut failed_dep = None;
            for d in &job.depends_on {
                match jobs.get(d).map(|x| x.status) {
                    Some(JobStatus::Succeeded) => {}
                    Some(s @ (JobStatus::Failed | JobStatus::Cancelled)) => {
                        failed_dep = Some(
                            format!("dependency {d} ({}) {:?}", jobs[d].name, s).to_lowercase(),
                        )
                    }
                    Some(_) => waiting = true,
                    None => failed_dep = Some(format!("dependency {d} does not exist")),
                }
            }
            if let Some(reason) = failed_dep {
                self.state
                    .record_one(
                        &streams::job(job.id),
                        HerdEvent::JobFailed {
                            job: job.id,
                            reason,
                        },
                    )
                    .await?;
                continue;
            }
            if waiting {
                continue;
            }
            let slot = match self.claim_slot(job.id) {
                Claim::Slot(slot) => slot,
                Claim::Taken => continue,
                Claim::Full => return Ok(()),
            };
            // Cancelled since this pass read the queue (the cancel recorded
            // it before letting go of the job): not started.
            let still_queued = self
                .state
                .projection
                .read()
                .await
                .rows
                .get(&job.id)
                .is_some_and(|j| j.status == JobStatus::Queued);
            if !still_queued {
                self.release(job.id, Some(slot));
                continue;
            }
            if let Err(e) = self.clone().start(&job, slot, &jobs).await {
                let cancelled = self.was_cancelled(job.id);
                self.release(job.id, Some(slot));
                let event = if cancelled {
                    HerdEvent::JobCancelled {
                        job: job.id,
                        reason: "cancelled by request while starting".into(),
                    }
                } else {
                    HerdEvent::JobFailed {
                        job: job.id,
                        reason: self
                            .state
                            .without_server_paths(&format!("could not start: {e:#}")),
                    }
                };
                self.state.record_one(&streams::job(job.id), event).await?;
            }
        }
        Ok(())
    }

    /// Prepare, start through the executor, record `JobStarted`, follow.
    async fn start(
        self: Arc<Self>,
        job: &JobView,
        slot: usize,
        jobs: &BTreeMap<Uuid, JobView>,
    ) -> Result<()> {
        let p = self.prepare(job, jobs).await?;
        let executor = self.config.executor.clone();
        let placement = executor.placement(job, slot);
        let job_file =
            Self::write_job_file(job, &p, &placement, self.state.data_dir.join("blobs"))?;
        let started = executor
            .start(Launch {
                job,
                attempt: job.attempts + 1,
                job_file,
                workdir: p.workdir.clone(),
                placement: placement.clone(),
            })
            .await?;
        let (kill_tx, kill_rx) = oneshot::channel();
        self.arm(job.id, kill_tx, started.pid);
        let event = Self::started_event(job, &p, &placement, &started);
        let mut follow = started.follow;
        if let Err(e) = self.state.record_one(&streams::job(job.id), event).await {
            follow.stop().await;
            return Err(e);
        }
        let attempt = Attempt::new(job.id, job.attempts + 1, p.adapter_base, p.notes);
        self.spawn_follow(attempt, follow, kill_rx, Some(slot));
        Ok(())
    }

    /// Follow an attempt to its end on a task of its own, then free its slot.
    fn spawn_follow(
        self: &Arc<Self>,
        attempt: Attempt,
        follow: Box<dyn Follow>,
        kill_rx: oneshot::Receiver<()>,
        slot: Option<usize>,
    ) {
        let me = self.clone();
        let id = attempt.id;
        tokio::spawn(async move {
            if let Err(e) = me.follow(attempt, follow, kill_rx).await {
                tracing::error!("job {id}: following its worker: {e:#}");
            }
            me.release(id, slot);
        });
    }

    /// Turn the worker's lines into events until the attempt ends, and
    /// record how it ended. A kill (cancel, or shutdown of a worker that
    /// dies with the daemon) asks the executor to stop it; at shutdown, an
    /// attempt that outlives the daemon is left running, unrecorded.
    async fn follow(
        &self,
        mut attempt: Attempt,
        mut follow: Box<dyn Follow>,
        mut kill_rx: oneshot::Receiver<()>,
    ) -> Result<()> {
        let id = attempt.id;
        let survives = self.config.executor.survives_restart();
        let mut shutdown = self.shutdown_signal.subscribe();
        let mut stopping = false;
        let ending = loop {
            tokio::select! {
                next = follow.next() => match next? {
                    Next::Line(line) => attempt.apply(&self.state, &line).await?,
                    Next::Ended(ending) => break ending,
                },
                _ = &mut kill_rx, if !stopping => {
                    stopping = true;
                    follow.stop().await;
                }
                _ = async { shutdown.wait_for(|s| *s).await.is_ok() }, if survives => return Ok(()),
            }
        };
        let outcome = if self.was_cancelled(id) {
            Outcome::Cancelled
        } else if self.shutting_down.load(Ordering::SeqCst) && !survives {
            Outcome::Interrupted("the daemon shut down while this job was running; requeued".into())
        } else {
            Outcome::Executor(ending)
        };
        let event = attempt.finish(&self.state, outcome, self.config.max_attempts);
        self.state.record_one(&streams::job(id), event).await?;
        Ok(())
    }

    /// A free slot, now `job`'s, and its running entry (not yet armed: a
    /// cancel that comes while the job starts marks it, and `arm` acts on
    /// it). A job with an entry already (running, or being cancelled) is
    /// not claimed again.
    fn claim_slot(&self, job: Uuid) -> Claim {
        let mut running = self.running.lock().expect("running lock");
        if running.contains_key(&job) {
            return Claim::Taken;
        }
        let mut slots = self.slots.lock().expect("slots lock");
        let Some(free) = slots.iter().position(|s| s.is_none()) else {
            return Claim::Full;
        };
        slots[free] = Some(job);
        running.insert(job, Running::unarmed());
        Claim::Slot(free)
    }

    /// A started worker's kill switch, given to its running entry; pulled at
    /// once when the job was cancelled (or the daemon began shutting down)
    /// while it started.
    fn arm(&self, id: Uuid, kill: oneshot::Sender<()>, pid: Option<u32>) {
        let mut running = self.running.lock().expect("running lock");
        let entry = running.entry(id).or_insert_with(Running::unarmed);
        entry.pid = pid;
        // A worker started as the daemon shuts down stops too, unless it
        // runs on without the daemon.
        let shutting_down =
            self.shutting_down.load(Ordering::SeqCst) && !self.config.executor.survives_restart();
        if entry.cancelled || shutting_down {
            let _ = kill.send(());
        } else {
            entry.kill = Some(kill);
        }
    }

    /// Whether `herd cancel` asked for this running job to end.
    fn was_cancelled(&self, id: Uuid) -> bool {
        self.running
            .lock()
            .expect("running lock")
            .get(&id)
            .is_some_and(|r| r.cancelled)
    }

    /// A job's slot and running entry are free again.
    fn release(&self, id: Uuid, slot: Option<usize>) {
        if let Some(slot) = slot {
            self.slots.lock().expect("slots lock")[slot] = None;
        }
        self.running.lock().expect("running lock").remove(&id);
        self.state
            .progress
            .lock()
            .expect("progress lock")
            .remove(&id);
        self.state.wake.notify_one();
    }

    /// Cancel a queued or running job. Returns false when it already ended.
    pub async fn cancel(&self, id: Uuid) -> Result<bool> {
        let status = self
            .state
            .projection
            .read()
            .await
            .rows
            .get(&id)
            .map(|j| j.status);
        match status {
            None => bail!("no job {id}"),
            Some(s) if s.is_final() => Ok(false),
            Some(_) => {
                // Under the lock: a job with a running entry is stopped by
                // its worker's end (or by `arm`, while it starts); one
                // without gets an entry that keeps the scheduler from
                // claiming it until its cancel is recorded.
                let killer = {
                    let mut running = self.running.lock().expect("running lock");
                    let held = running.contains_key(&id);
                    let r = running.entry(id).or_insert_with(Running::unarmed);
                    r.cancelled = true;
                    held.then(|| r.kill.take())
                };
                match killer {
                    Some(Some(tx)) => {
                        let _ = tx.send(());
                    }
                    Some(None) => {}
                    None => {
                        let recorded = self
                            .state
                            .record_one(
                                &streams::job(id),
                                HerdEvent::JobCancelled {
                                    job: id,
                                    reason: "cancelled by request".into(),
                                },
                            )
                            .await;
                        self.running.lock().expect("running lock").remove(&id);
                        recorded?;
                    }
                }
                Ok(true)
            }
        }
    }

    /// Worker pids of running jobs (for tests and `status`).
    pub fn worker_pid(&self, id: Uuid) -> Option<u32> {
        self.running
            .lock()
            .expect("running lock")
            .get(&id)
            .and_then(|r| r.pid)
    }

    /// Stop every worker that dies with the daemon; their jobs are recorded
    /// as interrupted (requeued at the next start). Jobs of an executor
    /// that outlives the daemon run on; their followers stop here and the
    /// next daemon re-attaches. Waits up to `grace` for the records.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.shutdown_signal.send(true);
        let survive = self.config.executor.survives_restart();
        let killers: Vec<_> = self
            .running
            .lock()
            .expect("running lock")
            .values_mut()
            .filter(|_| !survive)
            .filter_map(|r| r.kill.take())
            .collect();
        for k in killers {
            let _ = k.send(());
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !self.running.lock().expect("running lock").is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
