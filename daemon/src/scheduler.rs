//! Puts queued jobs on devices: one job per GPU, a configurable number of CPU
//! jobs; highest priority first, then submission order; a job waits for the
//! jobs it depends on and fails (with the reason) if one of them failed.
//!
//! Each started job is a worker process watched by a monitor task that turns
//! the worker's messages into events. Cancel kills the process; a daemon
//! restart marks jobs it finds running as interrupted and requeues them
//! (up to `max_attempts`).

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
use crate::state::{Progress, State};
use crate::worker::{JobFile, WorkerMessage};

/// The kind of job recorded for work done outside herd.

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Program and leading arguments that start a worker (`herdd worker`).
    pub worker_command: Vec<String>,
    /// Devices, one slot each: "cpu" may repeat, "cuda:N".
    pub devices: Vec<String>,
    /// CPU threads given to each job on a CPU slot.
    pub cpu_threads: usize,
    pub max_attempts: u32,
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
        }
    }
}

struct Running {
    kill: Option<oneshot::Sender<()>>,
    cancelled: bool,
    pid: Option<u32>,
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

    pub fn devices(&self) -> Vec<String> {
        self.config.devices.clone()
    }

    /// Jobs left running by a daemon that died: requeue (bounded) or fail.
    pub async fn recover(&self) -> Result<()> {
        let stuck: Vec<JobView> = {
            let p = self.state.projection.read().await;
            p.jobs
                .values()
                .filter(|j| j.status == JobStatus::Running && j.kind.is_recipe())
                .cloned()
                .collect()
        };
        for j in stuck {
            let event = if j.attempts >= self.config.max_attempts {
                HerdEvent::JobFailed {
                    job: j.id,
                    reason: format!(
                        "interrupted {} times (daemon restarts); giving up",
                        j.attempts
                    ),
                }
            } else {
                HerdEvent::JobInterrupted {
                    job: j.id,
                    reason: "the daemon stopped while this job was running; requeued".into(),
                }
            };
            self.state.record_one(&streams::job(j.id), event).await?;
        }
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
            let slot = {
                let mut slots = self.slots.lock().expect("slots lock");
                let free = slots.iter().position(|s| s.is_none());
                if let Some(i) = free {
                    slots[i] = Some(job.id);
                }
                free
            };
            let Some(slot) = slot else { return Ok(()) };
            if let Err(e) = self.clone().start(&job, slot, &jobs).await {
                self.slots.lock().expect("slots lock")[slot] = None;
                self.running.lock().expect("running lock").remove(&job.id);
                self.state
                    .record_one(
                        &streams::job(job.id),
                        HerdEvent::JobFailed {
                            job: job.id,
                            reason: self
                                .state
                                .without_server_paths(&format!("could not start: {e:#}")),
                        },
                    )
                    .await?;
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

    async fn start(
        self: Arc<Self>,
        job: &JobView,
        slot: usize,
        jobs: &BTreeMap<Uuid, JobView>,
    ) -> Result<()> {
        let kind = job.kind;
        let resolved = Self::resolve(job, jobs)?;
        // Adapters must adapt the model they are given with; what an adapter
        // output adapts is recorded with it.
        let adapter_base =
            crate::references::adapter_base(&*self.state.projection.read().await, &resolved)
                .map_err(|e| anyhow!(e))?;
        let effective =
            jobs::effective_hyperparameters(kind, &job.hyperparameters).map_err(|e| anyhow!(e))?;
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
        let device = self.config.devices[slot].clone();
        let threads = if device == "cpu" {
            self.config.cpu_threads
        } else {
            1
        };
        let workdir = self.state.work_dir(job.id);
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir)?;
        let jf = JobFile {
            job: job.id,
            kind,
            hyperparameters: effective.clone(),
            seed: job.seed,
            inputs,
            workdir: workdir.join("out"),
            blobs_dir: self.state.data_dir.join("blobs"),
            device: device.clone(),
            threads,
        };
        let job_file = workdir.join("job.json");
        std::fs::write(&job_file, serde_json::to_vec_pretty(&jf)?)?;
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
        self.running.lock().expect("running lock").insert(
            job.id,
            Running {
                kill: Some(kill_tx),
                cancelled: false,
                pid,
            },
        );
        let attempt = job.attempts + 1;
        let device_name = device.clone();
        let started = HerdEvent::JobStarted {
            job: job.id,
            attempt,
            device,
            pid,
            engine_version: herd_engine::ENGINE_VERSION.into(),
            threads: threads as u32,
            resolved_inputs: resolved,
            effective_hyperparameters: effective,
            fingerprint: herd_engine::fingerprint(&device_name, threads),
        };
        if let Err(e) = self.state.record_one(&streams::job(job.id), started).await {
            let _ = child.start_kill();
            return Err(e);
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let me = self.clone();
        let id = job.id;
        tokio::spawn(async move {
            let outcome = me
                .monitor(id, attempt, adapter_base, child, stdout, stderr, kill_rx)
                .await;
            if let Err(e) = outcome {
                tracing::error!("job {id}: monitor: {e:#}");
            }
            me.slots.lock().expect("slots lock")[slot] = None;
            me.running.lock().expect("running lock").remove(&id);
            me.state.progress.lock().expect("progress lock").remove(&id);
            me.state.wake.notify_one();
        });
        Ok(())
    }

    async fn monitor(
        &self,
        id: Uuid,
        attempt: u32,
        adapter_base: Option<String>,
        mut child: tokio::process::Child,
        stdout: tokio::process::ChildStdout,
        mut stderr: tokio::process::ChildStderr,
        mut kill_rx: oneshot::Receiver<()>,
    ) -> Result<()> {
        let stream = streams::job(id);
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
        let (mut done, mut failed, mut notes) = (None, None, vec![]);
        let mut killed = false;
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else { break };
                    let msg: WorkerMessage = match serde_json::from_str(&line) {
                        Ok(m) => m,
                        Err(_) => { notes.push(format!("worker said: {line}")); continue; }
                    };
                    match msg {
                        WorkerMessage::Metrics { step, points } => {
                            let points = points.into_iter().map(|(name, value)| MetricPoint { step, name, value }).collect();
                            self.state.record_one(&stream, HerdEvent::JobMetrics { job: id, attempt, points }).await?;
                        }
                        WorkerMessage::Progress { done, total } => {
                            self.state.progress.lock().expect("progress lock").insert(id, Progress { done, total });
                        }
                        WorkerMessage::Output { name, artifact, hash, mut summary } => {
                            if artifact == herd_core::ArtifactKind::Adapter {
                                if let (Some(base), Some(m)) = (&adapter_base, summary.as_object_mut()) {
                                    m.insert("base".into(), base.clone().into());
                                }
                            }
                            self.state.record_one(&stream, HerdEvent::JobOutput { job: id, name, hash, artifact, summary }).await?;
                        }
                        WorkerMessage::Note { message } => notes.push(message),
                        WorkerMessage::Done { summary } => done = Some(summary),
                        WorkerMessage::Failed { reason } => failed = Some(reason),
                    }
                }
                _ = &mut kill_rx, if !killed => {
                    killed = true;
                    let _ = child.start_kill();
                }
            }
        }
        let status = child.wait().await?;
        let stderr_tail = err_task.await.unwrap_or_default();
        let cancelled = self
            .running
            .lock()
            .expect("running lock")
            .get(&id)
            .map(|r| r.cancelled)
            .unwrap_or(false);
        let event = if cancelled {
            HerdEvent::JobCancelled {
                job: id,
                reason: "cancelled by request".into(),
            }
        } else if self.shutting_down.load(Ordering::SeqCst) {
            HerdEvent::JobInterrupted {
                job: id,
                reason: "the daemon shut down while this job was running; requeued".into(),
            }
        } else if let (Some(summary), true) = (done, status.success()) {
            let summary = if notes.is_empty() {
                summary
            } else {
                let notes: Vec<String> = notes
                    .iter()
                    .map(|n| self.state.without_server_paths(n))
                    .collect();
                serde_json::json!({"result": summary, "notes": notes})
            };
            HerdEvent::JobSucceeded { job: id, summary }
        } else {
            let reason = match failed {
                Some(r) => r,
                None => {
                    let how = match (
                        status.code(),
                        std::os::unix::process::ExitStatusExt::signal(&status),
                    ) {
                        (_, Some(sig)) => format!("worker killed by signal {sig}"),
                        (Some(c), _) => format!("worker exited with status {c}"),
                        _ => "worker ended abnormally".into(),
                    };
                    let tail = stderr_tail.trim();
                    if tail.is_empty() {
                        how
                    } else {
                        format!("{how}; stderr: {tail}")
                    }
                }
            };
            HerdEvent::JobFailed {
                job: id,
                reason: self.state.without_server_paths(&reason),
            }
        };
        self.state.record_one(&stream, event).await?;
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
                let killer = {
                    let mut running = self.running.lock().expect("running lock");
                    running.get_mut(&id).map(|r| {
                        r.cancelled = true;
                        r.kill.take()
                    })
                };
                match killer {
                    Some(Some(tx)) => {
                        let _ = tx.send(());
                    }
                    Some(None) => {}
                    None => {
                        self.state
                            .record_one(
                                &streams::job(id),
                                HerdEvent::JobCancelled {
                                    job: id,
                                    reason: "cancelled by request".into(),
                                },
                            )
                            .await?;
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

    /// Stop every worker; their jobs are recorded as interrupted (requeued
    /// at the next start). Waits up to `grace` for the records.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let killers: Vec<_> = self
            .running
            .lock()
            .expect("running lock")
            .values_mut()
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
