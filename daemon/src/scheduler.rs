//! Puts queued jobs on devices: one job per GPU, a configurable number of CPU
//! jobs; highest priority first, then submission order; a job waits for the
//! jobs it depends on and fails (with the reason) if one of them failed.
//!
//! Each started job is a worker process; a task follows it and turns the
//! worker's messages into events. Where the worker runs is the executor:
//!
//! * `Local`: a child process on this machine, one per device slot; its
//!   messages come on its stdout. Cancel kills it; a daemon restart finds
//!   its jobs running, marks them interrupted and requeues them (up to
//!   `max_attempts`).
//! * `Slurm`: `sbatch` of a script that runs `herdd worker` on a node; the
//!   slots are the cap on jobs in flight. The worker appends its messages
//!   to a file in the job's work directory (the data directory is shared
//!   with the nodes), which the daemon follows by offset while asking
//!   `scontrol` for the job's state. Cancel is `scancel`; Slurm's reason
//!   ends a job it ended (time limit, memory, node failure, the last
//!   requeued under the requeue policy). A daemon restart re-attaches: it
//!   reads the file again from the start and records only what the log
//!   does not already hold, so nothing is lost or recorded twice.
//!
//! Dependencies stay herd's (not `--dependency=afterok`): a job's inputs
//! are resolved to hashes and materialized before its job file is written,
//! and a failed dependency fails the job here with its reason.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use herd_core::model::{streams, HerdEvent, JobStatus, JobView, MetricPoint};
use herd_core::InputRef;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::jobs;
use crate::slurm::{self, Observed, SlurmConfig};
use crate::state::{Progress, State};
use crate::worker::{JobFile, WorkerMessage};

/// Where workers run.
#[derive(Debug, Clone)]
pub enum Executor {
    /// Child processes of the daemon, one per device slot.
    Local,
    /// Slurm jobs (`sbatch`), at most `max_in_flight` at a time.
    Slurm(SlurmConfig),
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Program and leading arguments that start a worker (`herdd worker`).
    pub worker_command: Vec<String>,
    /// Devices, one slot each: "cpu" may repeat, "cuda:N". For Slurm, one
    /// slot per job in flight (the device is the job's: its GPUs or CPUs).
    pub devices: Vec<String>,
    /// CPU threads given to each job on a CPU slot.
    pub cpu_threads: usize,
    pub max_attempts: u32,
    pub executor: Executor,
}

impl SchedulerConfig {
    /// CUDA devices when built with `cuda` and present, else `cpu_jobs` CPU slots.
    pub fn discover(worker_command: Vec<String>, cpu_jobs: usize) -> Self {
        let mut devices = herd_engine::device::cuda_devices();
        devices.extend(std::iter::repeat_n("cpu".to_string(), cpu_jobs.max(1)));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        SchedulerConfig {
            worker_command,
            devices,
            cpu_threads: (cores / cpu_jobs.max(1)).max(1),
            max_attempts: 3,
            executor: Executor::Local,
        }
    }

    /// Jobs go to Slurm, `slurm.max_in_flight` at a time.
    pub fn slurm(worker_command: Vec<String>, slurm: SlurmConfig) -> Self {
        SchedulerConfig {
            worker_command,
            devices: vec!["slurm".into(); slurm.max_in_flight.max(1)],
            cpu_threads: 1,
            max_attempts: 3,
            executor: Executor::Slurm(slurm),
        }
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
    slurm_job: Option<u64>,
}

impl Running {
    /// Held for a job with no worker to stop yet (starting, or having its
    /// cancel recorded).
    fn unarmed() -> Self {
        Running {
            kill: None,
            cancelled: false,
            pid: None,
            slurm_job: None,
        }
    }
}

/// What starting a job needs, whichever executor runs it.
struct Prepared {
    resolved: BTreeMap<String, String>,
    adapter_base: Option<String>,
    effective: serde_json::Value,
    inputs: BTreeMap<String, PathBuf>,
    workdir: PathBuf,
    /// Said by the scheduler itself (which inputs an `average` kept).
    notes: Vec<String>,
}

/// One attempt's messages, turned into events as they arrive.
struct Attempt {
    id: Uuid,
    attempt: u32,
    adapter_base: Option<String>,
    /// Re-attached: the last step of each metric and the outputs the log
    /// already holds for this attempt (a replayed message adds only what
    /// is new).
    recorded_steps: BTreeMap<String, u64>,
    recorded_outputs: BTreeMap<String, String>,
    notes: Vec<String>,
    done: Option<serde_json::Value>,
    failed: Option<String>,
}

/// How an attempt ended, as its executor saw it.
enum Ending {
    Cancelled,
    /// Requeued: the daemon shut down, or a node failed.
    Interrupted(String),
    /// The worker ended; `how` says how when it reported no failure itself.
    Ended {
        ok: bool,
        how: String,
    },
    /// Ended by the cluster for its own reason (time limit, memory).
    EndedBy(String),
}

impl Attempt {
    fn new(id: Uuid, attempt: u32, adapter_base: Option<String>, notes: Vec<String>) -> Self {
        Attempt {
            id,
            attempt,
            adapter_base,
            recorded_steps: BTreeMap::new(),
            recorded_outputs: BTreeMap::new(),
            notes,
            done: None,
            failed: None,
        }
    }

    async fn apply(&mut self, state: &State, line: &str) -> Result<()> {
        let id = self.id;
        let stream = streams::job(id);
        let msg: WorkerMessage = match serde_json::from_str(line) {
            Ok(m) => m,
            Err(_) => {
                self.notes.push(format!("worker said: {line}"));
                return Ok(());
            }
        };
        match msg {
            WorkerMessage::Metrics { step, points } => {
                let points: Vec<MetricPoint> = points
                    .into_iter()
                    .filter(|(name, _)| self.recorded_steps.get(name).is_none_or(|s| step > *s))
                    .map(|(name, value)| MetricPoint { step, name, value })
                    .collect();
                if !points.is_empty() {
                    let attempt = self.attempt;
                    state
                        .record_one(
                            &stream,
                            HerdEvent::JobMetrics {
                                job: id,
                                attempt,
                                points,
                            },
                        )
                        .await?;
                }
            }
            WorkerMessage::Progress { done, total } => {
                state
                    .progress
                    .lock()
                    .expect("progress lock")
                    .insert(id, Progress { done, total });
            }
            WorkerMessage::Output {
                name,
                artifact,
                hash,
                mut summary,
            } => {
                if self.recorded_outputs.get(&name) == Some(&hash) {
                    return Ok(());
                }
                if artifact == herd_core::ArtifactKind::Adapter {
                    if let (Some(base), Some(m)) = (&self.adapter_base, summary.as_object_mut()) {
                        m.insert("base".into(), base.clone().into());
                    }
                }
                state
                    .record_one(
                        &stream,
                        HerdEvent::JobOutput {
                            job: id,
                            name,
                            hash,
                            artifact,
                            summary,
                        },
                    )
                    .await?;
            }
            WorkerMessage::Note { message } => self.notes.push(message),
            WorkerMessage::Done { summary } => self.done = Some(summary),
            WorkerMessage::Failed { reason } => self.failed = Some(reason),
        }
        Ok(())
    }

    /// The event that ends the attempt.
    fn finish(self, state: &State, ending: Ending) -> HerdEvent {
        let id = self.id;
        match ending {
            Ending::Cancelled => HerdEvent::JobCancelled {
                job: id,
                reason: "cancelled by request".into(),
            },
            Ending::Interrupted(reason) => HerdEvent::JobInterrupted {
                job: id,
                reason,
                requeued: true,
            },
            Ending::EndedBy(reason) => HerdEvent::JobFailed {
                job: id,
                reason: state.without_server_paths(&reason),
            },
            Ending::Ended { ok, how } => match (self.done, ok) {
                (Some(summary), true) => {
                    let summary = if self.notes.is_empty() {
                        summary
                    } else {
                        let notes: Vec<String> = self
                            .notes
                            .iter()
                            .map(|n| state.without_server_paths(n))
                            .collect();
                        serde_json::json!({"result": summary, "notes": notes})
                    };
                    HerdEvent::JobSucceeded { job: id, summary }
                }
                _ => HerdEvent::JobFailed {
                    job: id,
                    reason: state.without_server_paths(&self.failed.unwrap_or(how)),
                },
            },
        }
    }
}

pub struct Scheduler {
    state: Arc<State>,
    config: SchedulerConfig,
    slots: Mutex<Vec<Option<Uuid>>>,
    running: Mutex<HashMap<Uuid, Running>>,
    shutting_down: AtomicBool,
}

impl Scheduler {
    pub fn new(state: Arc<State>, config: SchedulerConfig) -> Arc<Self> {
        let slots = Mutex::new(vec![None; config.devices.len()]);
        Arc::new(Scheduler {
            state,
            config,
            slots,
            running: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// `local` or `slurm`.
    pub fn executor_name(&self) -> &'static str {
        match self.config.executor {
            Executor::Local => "local",
            Executor::Slurm(_) => "slurm",
        }
    }

    pub fn devices(&self) -> Vec<String> {
        self.config.devices.clone()
    }

    /// Jobs left running by a daemon that died or stopped: Slurm jobs are
    /// re-attached (they run on without the daemon); local ones were
    /// killed with it and are requeued (bounded) or failed.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let stuck: Vec<JobView> = {
            let p = self.state.projection.read().await;
            p.jobs
                .values()
                .filter(|j| j.status == JobStatus::Running && j.kind.is_recipe())
                .cloned()
                .collect()
        };
        for j in stuck {
            let event = match (j.slurm_job, &self.config.executor) {
                (Some(slurm_job), Executor::Slurm(config)) => {
                    self.reattach(&j, slurm_job, config.clone()).await?;
                    continue;
                }
                (Some(slurm_job), Executor::Local) => {
                    // Nothing here can follow it: stop it there, run it again.
                    let cancelled = tokio::task::spawn_blocking(move || slurm::scancel(slurm_job))
                        .await?
                        .map(|()| format!("cancelled Slurm job {slurm_job}"))
                        .unwrap_or_else(|e| {
                            format!("could not cancel Slurm job {slurm_job}: {e:#}")
                        });
                    HerdEvent::JobInterrupted {
                        job: j.id,
                        reason: format!(
                            "this job ran on Slurm but the daemon now runs --executor local ({cancelled}); requeued"
                        ),
                        requeued: true,
                    }
                }
                (None, _) if j.attempts >= self.config.max_attempts => HerdEvent::JobFailed {
                    job: j.id,
                    reason: format!(
                        "interrupted {} times (daemon restarts); giving up",
                        j.attempts
                    ),
                },
                (None, _) => HerdEvent::JobInterrupted {
                    job: j.id,
                    reason: "the daemon stopped while this job was running; requeued".into(),
                    requeued: true,
                },
            };
            self.state.record_one(&streams::job(j.id), event).await?;
        }
        Ok(())
    }

    /// Follow a Slurm job a previous daemon started: its messages file from
    /// the start, recording only what the log does not hold yet.
    async fn reattach(
        self: &Arc<Self>,
        job: &JobView,
        slurm_job: u64,
        config: SlurmConfig,
    ) -> Result<()> {
        let adapter_base = crate::references::adapter_base(
            &*self.state.projection.read().await,
            &job.resolved_inputs,
        )
        .ok()
        .flatten();
        let mut attempt = Attempt::new(job.id, job.attempts, adapter_base, vec![]);
        attempt.recorded_steps = job
            .last_metrics
            .iter()
            .map(|(name, (step, _))| (name.clone(), *step))
            .collect();
        attempt.recorded_outputs = job.outputs.clone();
        let slot = match self.claim_slot(job.id) {
            Claim::Slot(slot) => Some(slot),
            Claim::Full | Claim::Taken => None,
        };
        tracing::info!("job {}: re-attached to Slurm job {slurm_job}", job.id);
        self.follow_slurm(job.id, slot, attempt, slurm_job, config);
        Ok(())
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

    /// Resolve `job:<id>/<output>` references to hashes.
    fn resolve(job: &JobView, jobs: &BTreeMap<Uuid, JobView>) -> Result<BTreeMap<String, String>> {
        job.inputs
            .iter()
            .map(|(name, v)| {
                let reference: InputRef = v.parse().map_err(|e| anyhow!("input `{name}`: {e}"))?;
                let hash = match reference {
                    InputRef::Blob(hash) => hash.to_string(),
                    InputRef::JobOutput {
                        job: id,
                        output: out,
                    } => {
                        let src = jobs
                            .get(&id)
                            .ok_or_else(|| anyhow!("input `{name}`: job {id} does not exist"))?;
                        src.outputs.get(&out).cloned().ok_or_else(|| {
                            anyhow!(
                                "input `{name}`: job {id} ({}) has no output `{out}`",
                                src.name
                            )
                        })?
                    }
                };
                Ok((name.clone(), hash))
            })
            .collect()
    }

    /// A local path for an input: checkpoints (trees) are materialized once,
    /// verified; datasets are used from the blob store after a verify.
    fn materialize(state: &State, hash: &str) -> Result<PathBuf> {
        let blobs = &state.store.blobs;
        if !blobs.contains(hash) {
            bail!("blob {hash} is not in the store");
        }
        if let Ok(tree) = blobs.tree(hash) {
            let dir = state.tree_cache(hash);
            // A cached copy is used only if it still holds the recorded
            // bytes: a worker never trains on anything but its input hashes.
            if dir.join(".complete").exists() {
                match blobs.check_materialized(hash, &dir) {
                    Ok(()) => return Ok(dir),
                    Err(e) => tracing::warn!(
                        "tree cache of {hash} no longer matches its blobs ({e}); materializing it again"
                    ),
                }
            }
            let tmp = dir.with_extension(format!("tmp-{}", Uuid::now_v7()));
            blobs.materialize(hash, &tmp)?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.parent().expect("cache has a parent"))?;
            std::fs::rename(&tmp, &dir)?;
            std::fs::write(dir.join(".complete"), serde_json::to_vec(&tree)?)?;
            return Ok(dir);
        }
        blobs.verify(hash)?;
        Ok(blobs.path_of(hash)?)
    }

    /// Inputs resolved and materialized, the work directory fresh: what
    /// every executor needs before its worker can start.
    async fn prepare(&self, job: &JobView, jobs: &BTreeMap<Uuid, JobView>) -> Result<Prepared> {
        let kind = job.kind;
        let effective =
            jobs::effective_hyperparameters(kind, &job.hyperparameters).map_err(|e| anyhow!(e))?;
        let mut resolved = Self::resolve(job, jobs)?;
        let mut notes = vec![];
        if kind == herd_core::JobKind::Average {
            if let Some(note) = Self::keep_top(job, &effective, jobs, &mut resolved)? {
                notes.push(note);
            }
        }
        // Adapters must adapt the model they are given with; what an adapter
        // output adapts is recorded with it.
        let adapter_base =
            crate::references::adapter_base(&*self.state.projection.read().await, &resolved)
                .map_err(|e| anyhow!(e))?;
        let state = self.state.clone();
        let resolved2 = resolved.clone();
        let inputs: BTreeMap<String, PathBuf> = tokio::task::spawn_blocking(move || {
            resolved2
                .iter()
                .map(|(n, h)| {
                    Ok((
                        n.clone(),
                        Self::materialize(&state, h).with_context(|| format!("input `{n}`"))?,
                    ))
                })
                .collect::<Result<_>>()
        })
        .await??;
        let workdir = self.state.work_dir(job.id);
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir)?;
        Ok(Prepared {
            resolved,
            adapter_base,
            effective,
            inputs,
            workdir,
            notes,
        })
    }

    /// `average` with `top_k`: keep the inputs whose jobs rank best by the
    /// metric's last value (ties by input name). With no more inputs than
    /// `top_k` all are kept (a reproduction gives exactly the kept hashes).
    fn keep_top(
        job: &JobView,
        effective: &serde_json::Value,
        jobs: &BTreeMap<Uuid, JobView>,
        resolved: &mut BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let params: jobs::average::Params = serde_json::from_value(effective.clone())?;
        let Some((metric, lowest_first)) = params.ranking() else {
            return Ok(None);
        };
        if resolved.len() <= params.top_k {
            return Ok(None);
        }
        let mut ranked = vec![];
        for (name, v) in &job.inputs {
            let source = match v.parse::<InputRef>() {
                Ok(InputRef::JobOutput { job: src, .. }) => jobs.get(&src),
                _ => None,
            }
            .ok_or_else(|| {
                anyhow!(
                    "input `{name}` is not a job's output, so it has no metric to rank by (top_k {} of {} inputs)",
                    params.top_k,
                    resolved.len()
                )
            })?;
            let (_, value) = source.last_metrics.get(metric).ok_or_else(|| {
                anyhow!(
                    "input `{name}`: job {} ({}) recorded no metric `{metric}` (it has: {})",
                    source.id,
                    source.name,
                    source
                        .last_metrics
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            if !value.is_finite() {
                bail!(
                    "input `{name}`: job {} ended with {metric} = {value}",
                    source.id
                );
            }
            ranked.push((*value, name.clone()));
        }
        ranked.sort_by(|a, b| {
            let by_value = if lowest_first {
                a.0.total_cmp(&b.0)
            } else {
                b.0.total_cmp(&a.0)
            };
            by_value.then_with(|| a.1.cmp(&b.1))
        });
        let kept: Vec<&(f64, String)> = ranked.iter().take(params.top_k).collect();
        resolved.retain(|name, _| kept.iter().any(|(_, k)| k == name));
        let said: Vec<String> = ranked
            .iter()
            .map(|(v, n)| {
                let mark = if resolved.contains_key(n) {
                    "kept"
                } else {
                    "left"
                };
                format!("{n} {v} ({mark})")
            })
            .collect();
        Ok(Some(format!(
            "top {} of {} by metric.{metric} ({}): {}",
            params.top_k,
            ranked.len(),
            if lowest_first {
                "lowest first"
            } else {
                "highest first"
            },
            said.join(", ")
        )))
    }

    fn write_job_file(
        job: &JobView,
        p: &Prepared,
        device: &str,
        threads: usize,
        blobs_dir: PathBuf,
    ) -> Result<PathBuf> {
        let jf = JobFile {
            job: job.id,
            kind: job.kind,
            hyperparameters: p.effective.clone(),
            seed: job.seed,
            inputs: p.inputs.clone(),
            workdir: p.workdir.join("out"),
            blobs_dir,
            device: device.to_string(),
            threads,
        };
        let job_file = p.workdir.join("job.json");
        std::fs::write(&job_file, serde_json::to_vec_pretty(&jf)?)?;
        Ok(job_file)
    }

    fn started_event(
        job: &JobView,
        p: &Prepared,
        device: &str,
        threads: usize,
        pid: Option<u32>,
        slurm_job: Option<u64>,
    ) -> HerdEvent {
        HerdEvent::JobStarted {
            job: job.id,
            attempt: job.attempts + 1,
            device: device.to_string(),
            pid,
            slurm_job,
            engine_version: herd_engine::ENGINE_VERSION.into(),
            threads: threads as u32,
            resolved_inputs: p.resolved.clone(),
            effective_hyperparameters: p.effective.clone(),
            fingerprint: herd_engine::fingerprint(device, threads),
        }
    }

    async fn start(
        self: Arc<Self>,
        job: &JobView,
        slot: usize,
        jobs: &BTreeMap<Uuid, JobView>,
    ) -> Result<()> {
        let prepared = self.prepare(job, jobs).await?;
        match &self.config.executor {
            Executor::Local => self.clone().start_local(job, slot, prepared).await,
            Executor::Slurm(config) => {
                let config = config.clone();
                self.clone().start_slurm(job, slot, prepared, config).await
            }
        }
    }

    async fn start_local(self: Arc<Self>, job: &JobView, slot: usize, p: Prepared) -> Result<()> {
        let device = self.config.devices[slot].clone();
        let threads = if device == "cpu" {
            self.config.cpu_threads
        } else {
            1
        };
        let job_file =
            Self::write_job_file(job, &p, &device, threads, self.state.data_dir.join("blobs"))?;
        let (prog, args) = self
            .config
            .worker_command
            .split_first()
            .ok_or_else(|| anyhow!("no worker command"))?;
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .arg("--job-file")
            .arg(&job_file)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker {prog}"))?;
        let pid = child.id();
        let (kill_tx, kill_rx) = oneshot::channel();
        self.arm(job.id, kill_tx, pid, None);
        let started = Self::started_event(job, &p, &device, threads, pid, None);
        if let Err(e) = self.state.record_one(&streams::job(job.id), started).await {
            let _ = child.start_kill();
            return Err(e);
        }
        let attempt = Attempt::new(job.id, job.attempts + 1, p.adapter_base, p.notes);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let me = self.clone();
        let id = job.id;
        tokio::spawn(async move {
            let outcome = me.monitor(attempt, child, stdout, stderr, kill_rx).await;
            if let Err(e) = outcome {
                tracing::error!("job {id}: monitor: {e:#}");
            }
            me.release(id, Some(slot));
        });
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
    fn arm(&self, id: Uuid, kill: oneshot::Sender<()>, pid: Option<u32>, slurm_job: Option<u64>) {
        let mut running = self.running.lock().expect("running lock");
        let entry = running.entry(id).or_insert_with(Running::unarmed);
        entry.pid = pid;
        entry.slurm_job = slurm_job;
        // A local worker started as the daemon shuts down stops too (Slurm
        // jobs run on without the daemon).
        let shutting_down = self.shutting_down.load(Ordering::SeqCst) && slurm_job.is_none();
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

    async fn start_slurm(
        self: Arc<Self>,
        job: &JobView,
        slot: usize,
        p: Prepared,
        config: SlurmConfig,
    ) -> Result<()> {
        let resources = config.resources(job.kind, job.resources);
        let threads = resources.cpus.unwrap_or(1).max(1) as usize;
        // Slurm hands the job its GPUs as the first visible ones.
        let device = if resources.gpus.unwrap_or(0) > 0 {
            "cuda:0".to_string()
        } else {
            "cpu".to_string()
        };
        let job_file =
            Self::write_job_file(job, &p, &device, threads, self.state.data_dir.join("blobs"))?;
        let mut command: Vec<String> = self
            .config
            .worker_command
            .iter()
            .map(|a| slurm::sh_quote(a))
            .collect();
        command.push("--job-file".into());
        command.push(slurm::sh_quote(&job_file.display().to_string()));
        command.push("--messages".into());
        command.push(format!(
            "{}/messages-\"$SLURM_JOB_ID\".jsonl",
            slurm::sh_quote(&p.workdir.display().to_string())
        ));
        let script = p.workdir.join("job.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# herd job {} ({}), attempt {}\nexport RAYON_NUM_THREADS={threads} CANDLE_NUM_THREADS={threads}\nexec {}\n",
                job.id,
                job.name,
                job.attempts + 1,
                command.join(" ")
            ),
        )?;
        let name = slurm::job_name(job.id);
        let workdir = p.workdir.clone();
        let slurm_job = tokio::task::spawn_blocking(move || {
            // An attempt a daemon submitted but died before recording.
            slurm::scancel_by_name(&name)?;
            slurm::sbatch(&config, &name, resources, &workdir, &script)
        })
        .await??;
        let started = Self::started_event(job, &p, &device, threads, None, Some(slurm_job));
        if let Err(e) = self.state.record_one(&streams::job(job.id), started).await {
            let _ = tokio::task::spawn_blocking(move || slurm::scancel(slurm_job)).await;
            return Err(e);
        }
        let attempt = Attempt::new(job.id, job.attempts + 1, p.adapter_base, p.notes);
        let Executor::Slurm(config) = &self.config.executor else {
            unreachable!("start_slurm runs for the Slurm executor")
        };
        self.follow_slurm(job.id, Some(slot), attempt, slurm_job, config.clone());
        Ok(())
    }

    /// Follow Slurm job `slurm_job` until it ends: its messages file by
    /// offset, its state from `scontrol` every `config.poll`.
    fn follow_slurm(
        self: &Arc<Self>,
        id: Uuid,
        slot: Option<usize>,
        attempt: Attempt,
        slurm_job: u64,
        config: SlurmConfig,
    ) {
        let (kill_tx, kill_rx) = oneshot::channel();
        self.arm(id, kill_tx, None, Some(slurm_job));
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.follow(attempt, slurm_job, config, kill_rx).await {
                tracing::error!("job {id}: following Slurm job {slurm_job}: {e:#}");
            }
            me.release(id, slot);
        });
    }

    async fn follow(
        &self,
        mut attempt: Attempt,
        slurm_job: u64,
        config: SlurmConfig,
        mut kill_rx: oneshot::Receiver<()>,
    ) -> Result<()> {
        let id = attempt.id;
        let workdir = self.state.work_dir(id);
        let mut messages = MessageFile::new(slurm::messages_file(&workdir, slurm_job));
        let mut killed = false;
        let mut asked: Option<tokio::time::Instant> = None;
        let info = loop {
            for line in messages.read_lines()? {
                attempt.apply(&self.state, &line).await?;
            }
            if self.shutting_down.load(Ordering::SeqCst) {
                // The job runs on; the next daemon re-attaches.
                return Ok(());
            }
            // Once the worker has said how it ended, its Slurm job is about
            // to end too: ask more often.
            let poll = if attempt.done.is_some() || attempt.failed.is_some() {
                Duration::from_millis(100).min(config.poll)
            } else {
                config.poll
            };
            if asked.is_none_or(|t| t.elapsed() >= poll) {
                asked = Some(tokio::time::Instant::now());
                match tokio::task::spawn_blocking(move || slurm::show_job(slurm_job)).await? {
                    Ok(Observed::Known(info)) if info.is_active() => {}
                    Ok(Observed::Known(info)) => break Some(info),
                    Ok(Observed::Gone) => break None,
                    // The controller may be restarting: ask again later.
                    Err(e) => tracing::warn!("job {id}: {e:#}"),
                }
            }
            tokio::select! {
                _ = &mut kill_rx, if !killed => {
                    killed = true;
                    if let Err(e) = tokio::task::spawn_blocking(move || slurm::scancel(slurm_job)).await? {
                        tracing::warn!("job {id}: {e:#}");
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        // What the worker wrote before it ended.
        for line in messages.read_lines()? {
            attempt.apply(&self.state, &line).await?;
        }
        let cancelled = self.was_cancelled(id);
        let output = || slurm::tail(&slurm::output_file(&workdir, slurm_job), 2000);
        let with_output = |how: String| {
            let said = output();
            if said.is_empty() {
                how
            } else {
                format!("{how}; its output: {said}")
            }
        };
        let ending = match info {
            _ if cancelled => Ending::Cancelled,
            None => Ending::Ended {
                ok: attempt.done.is_some(),
                how: with_output(format!(
                    "Slurm no longer knows job {slurm_job} (purged after MinJobAge?) and its worker reported no result"
                )),
            },
            Some(info) => match info.state.as_str() {
                "COMPLETED" => Ending::Ended {
                    ok: true,
                    how: with_output(format!(
                        "{}, but its worker reported no result",
                        info.describe(slurm_job)
                    )),
                },
                "FAILED" => Ending::Ended {
                    ok: false,
                    how: with_output(info.describe(slurm_job)),
                },
                _ if info.is_node_failure()
                    && config.requeue == slurm::RequeuePolicy::OnNodeFailure
                    && attempt.attempt < self.config.max_attempts =>
                {
                    Ending::Interrupted(format!(
                        "{}; requeued (attempt {} of {})",
                        info.describe(slurm_job),
                        attempt.attempt,
                        self.config.max_attempts
                    ))
                }
                "CANCELLED" => Ending::EndedBy(format!(
                    "{}: cancelled outside herd (scancel?)",
                    info.describe(slurm_job)
                )),
                _ => Ending::EndedBy(with_output(info.describe(slurm_job))),
            },
        };
        let event = attempt.finish(&self.state, ending);
        self.state.record_one(&streams::job(id), event).await?;
        Ok(())
    }

    async fn monitor(
        &self,
        mut attempt: Attempt,
        mut child: tokio::process::Child,
        stdout: tokio::process::ChildStdout,
        mut stderr: tokio::process::ChildStderr,
        mut kill_rx: oneshot::Receiver<()>,
    ) -> Result<()> {
        let id = attempt.id;
        let mut lines = BufReader::new(stdout).lines();
        let err_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            let text = String::from_utf8_lossy(&buf).to_string();
            text.chars()
                .rev()
                .take(2000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        });
        let mut killed = false;
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else { break };
                    attempt.apply(&self.state, &line).await?;
                }
                _ = &mut kill_rx, if !killed => {
                    killed = true;
                    let _ = child.start_kill();
                }
            }
        }
        let status = child.wait().await?;
        let stderr_tail = err_task.await.unwrap_or_default();
        let cancelled = self.was_cancelled(id);
        let ending = if cancelled {
            Ending::Cancelled
        } else if self.shutting_down.load(Ordering::SeqCst) {
            Ending::Interrupted("the daemon shut down while this job was running; requeued".into())
        } else {
            let how = match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (_, Some(sig)) => format!("worker killed by signal {sig}"),
                (Some(c), _) => format!("worker exited with status {c}"),
                _ => "worker ended abnormally".into(),
            };
            let tail = stderr_tail.trim();
            Ending::Ended {
                ok: status.success(),
                how: if tail.is_empty() {
                    how
                } else {
                    format!("{how}; stderr: {tail}")
                },
            }
        };
        let event = attempt.finish(&self.state, ending);
        self.state.record_one(&streams::job(id), event).await?;
        Ok(())
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

    /// Stop every local worker; their jobs are recorded as interrupted
    /// (requeued at the next start). Slurm jobs run on and are re-attached
    /// at the next start. Waits up to `grace` for the records.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let killers: Vec<_> = self
            .running
            .lock()
            .expect("running lock")
            .values_mut()
            // Slurm jobs run on without the daemon; their followers stop.
            .filter(|r| r.slurm_job.is_none())
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

/// A file a worker appends JSON lines to, read by offset: only whole lines
/// are taken; a line still being written waits for the next read.
struct MessageFile {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl MessageFile {
    fn new(path: PathBuf) -> Self {
        MessageFile {
            path,
            offset: 0,
            partial: vec![],
        }
    }

    fn read_lines(&mut self) -> Result<Vec<String>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            // Not created yet: the job has not started on its node.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![];
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(vec![]);
        };
        let rest = self.partial.split_off(end + 1);
        let whole = std::mem::replace(&mut self.partial, rest);
        Ok(String::from_utf8_lossy(&whole)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }
}
