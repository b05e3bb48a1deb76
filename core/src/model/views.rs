//! The views folded from the events: experiments, rounds, jobs, artifacts,
//! lineage. `Projection::apply` is a pure fold: folding from sequence 1
//! equals a projection kept live, always.
//!
//! Every job has a small `JobRow` (what history filters and sorts on); its
//! full `JobView` is *resident* here or, once the job has ended, may be
//! evicted to a view store the daemon keeps on disk: memory follows what is
//! live, not history. `dirty` says what changed since the last checkpoint.
//! Metric points are not here: the daemon indexes them on disk.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::events::{ExecutorHandle, HerdEvent, Stored};
use super::rows::{Dirty, JobRow, Names};
use crate::vocab::{ArtifactKind, JobKind, Resources};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Its later events were lost to a repair: ended, resubmittable.
    Interrupted,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded
                | JobStatus::Failed
                | JobStatus::Cancelled
                | JobStatus::Interrupted
        )
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::parse(s).ok_or_else(|| {
            format!(
                "status {s:?} is not queued, running, succeeded, failed, cancelled or interrupted"
            )
        })
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub created_ms: u64,
    pub rounds: Vec<Uuid>,
    pub jobs: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    pub id: Uuid,
    pub experiment: Uuid,
    pub index: u32,
    pub spec: Value,
    pub jobs: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: Uuid,
    pub experiment: Option<Uuid>,
    pub round: Option<Uuid>,
    pub name: String,
    pub kind: JobKind,
    pub status: JobStatus,
    pub inputs: BTreeMap<String, String>,
    pub resolved_inputs: BTreeMap<String, String>,
    pub hyperparameters: Value,
    pub effective_hyperparameters: Value,
    pub seed: u64,
    pub depends_on: Vec<Uuid>,
    pub priority: i32,
    pub reproduces: Option<Uuid>,
    pub attempts: u32,
    pub device: Option<String>,
    pub engine_version: Option<String>,
    pub threads: Option<u32>,
    /// The build and machine the latest attempt ran on (see JobStarted).
    #[serde(default)]
    pub fingerprint: BTreeMap<String, String>,
    /// What the job asked of a cluster executor (over the kind's defaults).
    #[serde(default)]
    pub resources: Resources,
    /// The latest attempt's executor and its id there.
    #[serde(default)]
    pub executor: Option<ExecutorHandle>,
    /// `executor`'s id when that is Slurm: kept for clients that read it.
    #[serde(default)]
    pub slurm_job: Option<u64>,
    pub outputs: BTreeMap<String, String>,
    /// Last value and step of each metric.
    #[serde(with = "crate::number::last_values")]
    pub last_metrics: BTreeMap<String, (u64, f64)>,
    pub metric_points: u64,
    pub summary: Value,
    pub error: Option<String>,
    pub submitted_seq: u64,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// An external run's tags (MLflow's `set-tag`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl JobView {
    /// The jobs whose outputs this job was given but left out when it
    /// started (an `average` with `top_k` keeps only the best): each with
    /// the input name it came in under. Empty before the job starts.
    pub fn left_out(&self) -> Vec<(&str, Uuid)> {
        if self.resolved_inputs.is_empty() {
            return vec![];
        }
        self.inputs
            .iter()
            .filter(|(name, _)| !self.resolved_inputs.contains_key(*name))
            .filter_map(|(name, r)| match r.parse() {
                Ok(crate::InputRef::JobOutput { job, .. }) => Some((name.as_str(), job)),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub hash: String,
    pub artifact: ArtifactKind,
    pub name: String,
    pub summary: Value,
    /// The job whose output this is (None for imports).
    pub produced_by: Option<Uuid>,
    pub recorded_seq: u64,
}

/// A node of a lineage tree: an artifact, the job that made it, and that
/// job's inputs, recursively, down to imports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageNode {
    pub hash: String,
    pub artifact: Option<ArtifactKind>,
    pub name: String,
    pub job: Option<LineageJob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineageJob {
    pub id: Uuid,
    pub kind: JobKind,
    pub name: String,
    pub inputs: BTreeMap<String, LineageNode>,
}

/// All views, folded from the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Projection {
    pub last_seq: u64,
    pub experiments: BTreeMap<Uuid, ExperimentView>,
    pub rounds: BTreeMap<Uuid, RoundView>,
    /// Resident job views: every job not yet ended, and ended ones until the
    /// daemon evicts them to its view store.
    pub jobs: BTreeMap<Uuid, JobView>,
    /// Every job's row, resident or not.
    #[serde(skip)]
    pub rows: BTreeMap<Uuid, JobRow>,
    pub artifacts: BTreeMap<String, ArtifactView>,
    /// Events of types this version does not know (written by a newer herd).
    pub unknown_events: u64,
    /// Events that did not decode, with the reason (never silently dropped).
    pub undecodable: Vec<(u64, String)>,
    /// Every `herdd repair` that lost events, in order.
    #[serde(default)]
    pub repairs: Vec<RepairView>,
    #[serde(skip)]
    pub dirty: Dirty,
    #[serde(skip)]
    pub names: Names,
}

/// Two projections are equal when they record the same things (rows are
/// derived from the views; what is dirty says only when they were saved).
/// A repair that lost events, as the record tells it (`HistoryRepaired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairView {
    /// The `HistoryRepaired` event's sequence: history before it lost
    /// `first_lost..=last_lost` (their numbers were given again after it).
    pub seq: u64,
    pub repaired_ms: u64,
    pub first_lost: u64,
    pub last_lost: u64,
    pub acknowledged_lost: u64,
    pub reason: String,
    pub quarantine_file: Option<String>,
    pub interrupted_jobs: Vec<Uuid>,
}

impl RepairView {
    /// One line for people: what was lost, how much was acknowledged, why.
    pub fn describe(&self) -> String {
        let events = if self.first_lost == self.last_lost {
            format!("event {}", self.first_lost)
        } else {
            format!("events {}–{}", self.first_lost, self.last_lost)
        };
        let kept = match &self.quarantine_file {
            Some(f) => format!("; the damaged records are kept in DATA/{f}"),
            None => String::new(),
        };
        format!(
            "history was repaired at event {}: {events} lost ({} of them acknowledged): {}{kept}",
            self.seq, self.acknowledged_lost, self.reason
        )
    }
}

impl PartialEq for Projection {
    fn eq(&self, other: &Self) -> bool {
        self.last_seq == other.last_seq
            && self.experiments == other.experiments
            && self.rounds == other.rounds
            && self.jobs == other.jobs
            && self.rows == other.rows
            && self.artifacts == other.artifacts
            && self.unknown_events == other.unknown_events
            && self.undecodable == other.undecodable
            && self.repairs == other.repairs
    }
}

impl Projection {
    /// Fold one event. Events must come in sequence order; repeats are ignored.
    pub fn apply(&mut self, rec: &Stored) {
        let event = HerdEvent::from_recorded(rec);
        self.apply_decoded(rec.seq, rec.timestamp_ms, event);
    }

    /// Fold one event already decoded (the daemon decodes once for the
    /// projection and its metric index). An event about a job whose view is
    /// not resident must be preceded by [`Projection::make_resident`].
    pub fn apply_decoded(&mut self, seq: u64, ts: u64, event: Result<HerdEvent, String>) {
        if seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        let event = match event {
            Ok(e) => e,
            Err(reason) => {
                self.undecodable.push((seq, reason));
                return;
            }
        };
        let job = event.job();
        debug_assert!(
            job.is_none_or(|j| self.jobs.contains_key(&j) || !self.rows.contains_key(&j)),
            "event {seq} is about job {job:?}, whose view is not resident"
        );
        let metrics_only = matches!(event, HerdEvent::JobMetrics { .. });
        self.fold(seq, ts, event);
        if let Some(id) = job {
            if let Some(view) = self.jobs.get(&id) {
                self.dirty.jobs.insert(id);
                match self.rows.get_mut(&id) {
                    // Metric points change only the row's last values.
                    Some(row) if metrics_only => row.metrics = self.names.metrics(view),
                    _ => {
                        let row = self.names.row(view);
                        self.rows.insert(id, row);
                    }
                }
            }
        }
    }

    /// Put an evicted job's view back (loaded from the view store).
    pub fn make_resident(&mut self, view: JobView) {
        self.jobs.insert(view.id, view);
    }

    /// Add a job's stored row (loading a checkpoint); its view stays in the
    /// view store until something asks for it.
    pub fn insert_row(&mut self, id: Uuid, row: JobRow) {
        let row = self.names.intern(row);
        self.rows.insert(id, row);
    }

    /// Whether the job is recorded (resident or not).
    pub fn has_job(&self, id: &Uuid) -> bool {
        self.rows.contains_key(id)
    }

    fn fold(&mut self, seq: u64, ts: u64, event: HerdEvent) {
        match event {
            HerdEvent::ExperimentCreated {
                experiment,
                name,
                description,
            } => {
                self.dirty.experiments.insert(experiment);
                self.experiments
                    .entry(experiment)
                    .or_insert(ExperimentView {
                        id: experiment,
                        name,
                        description,
                        created_ms: ts,
                        rounds: vec![],
                        jobs: vec![],
                    });
            }
            HerdEvent::ArtifactImported {
                hash,
                artifact,
                name,
                summary,
            } => {
                self.dirty.artifacts.insert(hash.clone());
                self.artifacts.entry(hash.clone()).or_insert(ArtifactView {
                    hash,
                    artifact,
                    name,
                    summary,
                    produced_by: None,
                    recorded_seq: seq,
                });
            }
            HerdEvent::RoundSubmitted {
                experiment,
                round,
                index,
                spec,
                jobs,
            } => {
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    e.rounds.push(round);
                    self.dirty.experiments.insert(experiment);
                }
                self.dirty.rounds.insert(round);
                self.rounds.insert(
                    round,
                    RoundView {
                        id: round,
                        experiment,
                        index,
                        spec,
                        jobs,
                    },
                );
            }
            HerdEvent::JobSubmitted {
                job,
                experiment,
                round,
                name,
                kind,
                inputs,
                hyperparameters,
                seed,
                depends_on,
                priority,
                reproduces,
                resources,
            } => {
                if let Some(e) = experiment.and_then(|x| self.experiments.get_mut(&x)) {
                    e.jobs.push(job);
                    self.dirty.experiments.insert(e.id);
                }
                self.jobs.insert(
                    job,
                    JobView {
                        id: job,
                        experiment,
                        round,
                        name,
                        kind,
                        status: JobStatus::Queued,
                        inputs,
                        resolved_inputs: BTreeMap::new(),
                        hyperparameters,
                        effective_hyperparameters: Value::Null,
                        seed,
                        depends_on,
                        priority,
                        reproduces,
                        attempts: 0,
                        device: None,
                        engine_version: None,
                        threads: None,
                        fingerprint: BTreeMap::new(),
                        resources,
                        executor: None,
                        slurm_job: None,
                        outputs: BTreeMap::new(),
                        last_metrics: BTreeMap::new(),
                        metric_points: 0,
                        summary: Value::Null,
                        error: None,
                        submitted_seq: seq,
                        submitted_ms: ts,
                        tags: BTreeMap::new(),
                        started_ms: None,
                        finished_ms: None,
                    },
                );
            }
            HerdEvent::JobStarted {
                job,
                attempt,
                device,
                engine_version,
                threads,
                resolved_inputs,
                effective_hyperparameters,
                fingerprint,
                executor,
                slurm_job,
                ..
            } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    // A new attempt starts its curves afresh: the views show
                    // the latest attempt (earlier ones stay in the log).
                    if attempt > 1 {
                        j.last_metrics.clear();
                        j.metric_points = 0;
                    }
                    j.status = JobStatus::Running;
                    j.attempts = attempt;
                    j.device = Some(device);
                    j.engine_version = Some(engine_version);
                    j.threads = Some(threads);
                    j.resolved_inputs = resolved_inputs;
                    j.effective_hyperparameters = effective_hyperparameters;
                    j.fingerprint = fingerprint;
                    // Old records name a Slurm job by its number only.
                    j.executor = executor.or(slurm_job.map(|id| ExecutorHandle {
                        executor: "slurm".into(),
                        id: id.to_string(),
                    }));
                    j.slurm_job = j
                        .executor
                        .as_ref()
                        .filter(|h| h.executor == "slurm")
                        .and_then(|h| h.id.parse().ok());
                    j.started_ms = Some(ts);
                    j.error = None;
                }
            }
            HerdEvent::JobMetrics {
                job,
                attempt,
                points,
            } => {
                // Late points of an attempt that was superseded stay in the log only.
                if let Some(j) = self
                    .jobs
                    .get_mut(&job)
                    .filter(|j| attempt == 0 || attempt >= j.attempts)
                {
                    j.metric_points += points.len() as u64;
                    for p in points {
                        // Look up before inserting: no key allocation for known names.
                        match j.last_metrics.get_mut(&p.name) {
                            Some(last) => *last = (p.step, p.value),
                            None => {
                                j.last_metrics.insert(p.name.clone(), (p.step, p.value));
                            }
                        }
                    }
                }
            }
            HerdEvent::JobOutput {
                job,
                name,
                hash,
                artifact,
                summary,
            } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.outputs.insert(name.clone(), hash.clone());
                }
                self.dirty.artifacts.insert(hash.clone());
                self.artifacts.entry(hash.clone()).or_insert(ArtifactView {
                    hash,
                    artifact,
                    name,
                    summary,
                    produced_by: Some(job),
                    recorded_seq: seq,
                });
            }
            HerdEvent::RunLogged { job, params, tags } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    for hp in [&mut j.hyperparameters, &mut j.effective_hyperparameters] {
                        if !hp.is_object() {
                            *hp = Value::Object(Default::default());
                        }
                        let m = hp.as_object_mut().expect("an object");
                        for (k, v) in &params {
                            m.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                    j.tags.extend(tags);
                }
            }
            HerdEvent::JobSucceeded { job, summary } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.status = JobStatus::Succeeded;
                    j.summary = summary;
                    j.finished_ms = Some(ts);
                }
            }
            HerdEvent::JobFailed { job, reason } => self.end(job, JobStatus::Failed, reason, ts),
            HerdEvent::JobCancelled { job, reason } => {
                self.end(job, JobStatus::Cancelled, reason, ts)
            }
            HerdEvent::JobInterrupted {
                job,
                reason,
                requeued: true,
            } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.status = JobStatus::Queued;
                    j.error = Some(reason);
                }
            }
            HerdEvent::JobInterrupted {
                job,
                reason,
                requeued: false,
            } => self.end(job, JobStatus::Interrupted, reason, ts),
            HerdEvent::HistoryRepaired {
                first_lost,
                last_lost,
                acknowledged_lost,
                reason,
                quarantine_file,
                interrupted_jobs,
            } => self.repairs.push(RepairView {
                seq,
                repaired_ms: ts,
                first_lost,
                last_lost,
                acknowledged_lost,
                reason,
                quarantine_file,
                interrupted_jobs,
            }),
            HerdEvent::Unknown { .. } => self.unknown_events += 1,
        }
    }

    fn end(&mut self, job: Uuid, status: JobStatus, reason: String, ts: u64) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.status = status;
            j.error = Some(reason);
            j.finished_ms = Some(ts);
        }
    }
}

/// Identifies this fold: views a daemon stored with other code (another
/// herd version, a changed fold) are rebuilt from the log, never trusted.
pub const VIEWS_VERSION: u64 = fnv1a(&[
    include_bytes!("views.rs"),
    include_bytes!("rows.rs"),
    include_bytes!("events.rs"),
    include_bytes!("../vocab.rs"),
]);

const fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut p = 0;
    while p < parts.len() {
        let mut i = 0;
        while i < parts[p].len() {
            h ^= parts[p][i] as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        p += 1;
    }
    h
}
