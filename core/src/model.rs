//! herd's record-keeping vocabulary: the typed events and the views folded
//! from them (experiments, rounds, jobs, datasets, checkpoints, lineage).
//!
//! These are facts about bookkeeping, not about training: a job has a kind,
//! inputs, hyperparameters and outputs, but what a kind *means* lives in the
//! daemon. Views are pure folds over the log: folding from sequence 1
//! equals a projection kept live, always.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::vocab::{ArtifactKind, JobKind};

/// A stored record as the fold reads it: the store's envelope fields and the
/// payload's JSON text. The store is a generic log; this is all of it that
/// the vocabulary needs.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub seq: u64,
    pub timestamp_ms: u64,
    pub event_type: &'a str,
    pub schema_version: u32,
    pub payload: &'a str,
}

/// An event ready to append: envelope fields and payload JSON.
#[derive(Debug)]
pub struct Encoded {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub payload: Box<RawValue>,
}

/// Current schema version of every event type below.
pub const SCHEMA_VERSION: u32 = 1;

/// One metric value at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    pub name: String,
    pub value: f64,
}

/// Everything herd records. `Unknown` keeps events written by a newer herd
/// readable (and skipped by the views) instead of failing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum HerdEvent {
    ExperimentCreated {
        experiment: Uuid,
        name: String,
        #[serde(default)]
        description: String,
    },
    /// A dataset or checkpoint brought in from outside (or written by a job).
    ArtifactImported {
        hash: String,
        /// "checkpoint" or a dataset kind: "preference", "sft", "prompts".
        artifact: ArtifactKind,
        name: String,
        #[serde(default)]
        summary: Value,
    },
    RoundSubmitted {
        experiment: Uuid,
        round: Uuid,
        index: u32,
        spec: Value,
        jobs: Vec<Uuid>,
    },
    JobSubmitted {
        job: Uuid,
        experiment: Option<Uuid>,
        round: Option<Uuid>,
        /// Name within its round ("rm", "sft", ...), or free text.
        name: String,
        kind: JobKind,
        /// Input name -> blob hash, or `job:<uuid>/<output>` for an output of
        /// another job not yet finished.
        inputs: BTreeMap<String, String>,
        hyperparameters: Value,
        seed: u64,
        #[serde(default)]
        depends_on: Vec<Uuid>,
        #[serde(default)]
        priority: i32,
        /// The job this one re-runs, when it is a reproduction.
        #[serde(default)]
        reproduces: Option<Uuid>,
    },
    JobStarted {
        job: Uuid,
        attempt: u32,
        device: String,
        #[serde(default)]
        pid: Option<u32>,
        engine_version: String,
        threads: u32,
        /// Inputs with every `job:` reference replaced by a hash.
        resolved_inputs: BTreeMap<String, String>,
        /// Hyperparameters with defaults filled in.
        #[serde(default)]
        effective_hyperparameters: Value,
        /// What of the build and machine can change the numbers (engine
        /// source hash, kernel path, threads, device, CUDA version).
        #[serde(default)]
        fingerprint: BTreeMap<String, String>,
    },
    JobMetrics {
        job: Uuid,
        /// The attempt (JobStarted.attempt) these points belong to; 0 for
        /// points recorded before attempts were kept apart, and for
        /// external runs, which have one attempt.
        #[serde(default)]
        attempt: u32,
        points: Vec<MetricPoint>,
    },
    JobOutput {
        job: Uuid,
        name: String,
        hash: String,
        artifact: ArtifactKind,
        #[serde(default)]
        summary: Value,
    },
    JobSucceeded {
        job: Uuid,
        #[serde(default)]
        summary: Value,
    },
    JobFailed {
        job: Uuid,
        reason: String,
    },
    JobCancelled {
        job: Uuid,
        reason: String,
    },
    /// The process running the job died with the daemon; it goes back to the queue.
    JobInterrupted {
        job: Uuid,
        reason: String,
    },
    #[serde(skip)]
    Unknown {
        event_type: String,
        payload: Value,
    },
}

impl HerdEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            HerdEvent::ExperimentCreated { .. } => "ExperimentCreated",
            HerdEvent::ArtifactImported { .. } => "ArtifactImported",
            HerdEvent::RoundSubmitted { .. } => "RoundSubmitted",
            HerdEvent::JobSubmitted { .. } => "JobSubmitted",
            HerdEvent::JobStarted { .. } => "JobStarted",
            HerdEvent::JobMetrics { .. } => "JobMetrics",
            HerdEvent::JobOutput { .. } => "JobOutput",
            HerdEvent::JobSucceeded { .. } => "JobSucceeded",
            HerdEvent::JobFailed { .. } => "JobFailed",
            HerdEvent::JobCancelled { .. } => "JobCancelled",
            HerdEvent::JobInterrupted { .. } => "JobInterrupted",
            HerdEvent::Unknown { .. } => "Unknown",
        }
    }

    /// What to append: the type and schema version go in the record's
    /// envelope, the fields in its payload.
    pub fn encode(&self) -> Encoded {
        let mut payload = serde_json::to_value(self).expect("events serialize");
        if let Value::Object(m) = &mut payload {
            m.remove("type");
        }
        Encoded {
            event_type: self.type_name(),
            schema_version: SCHEMA_VERSION,
            payload: serde_json::value::to_raw_value(&payload).expect("a JSON value serializes"),
        }
    }

    /// Decode a stored event, upcasting old schema versions; unknown types
    /// come back as `Unknown`, a known type that does not parse is an error.
    pub fn from_recorded(rec: &Stored) -> Result<Self, String> {
        // The hot type (metric batches) is read in place, without copying its payload.
        if rec.event_type == "JobMetrics" && rec.schema_version == SCHEMA_VERSION {
            #[derive(Deserialize)]
            struct Metrics {
                job: Uuid,
                #[serde(default)]
                attempt: u32,
                points: Vec<MetricPoint>,
            }
            return serde_json::from_str::<Metrics>(rec.payload)
                .map(|m| HerdEvent::JobMetrics {
                    job: m.job,
                    attempt: m.attempt,
                    points: m.points,
                })
                .map_err(|e| format!("event {} (JobMetrics): {e}", rec.seq));
        }
        let payload: Value = serde_json::from_str(rec.payload)
            .map_err(|e| format!("event {} ({}): payload: {e}", rec.seq, rec.event_type))?;
        let payload = upcast(rec.event_type, rec.schema_version, payload);
        let known = [
            "ExperimentCreated",
            "ArtifactImported",
            "RoundSubmitted",
            "JobSubmitted",
            "JobStarted",
            "JobMetrics",
            "JobOutput",
            "JobSucceeded",
            "JobFailed",
            "JobCancelled",
            "JobInterrupted",
        ];
        if !known.contains(&rec.event_type) {
            return Ok(HerdEvent::Unknown {
                event_type: rec.event_type.to_string(),
                payload,
            });
        }
        let mut obj = match payload {
            Value::Object(m) => m,
            other => {
                return Err(format!(
                    "event {} ({}): payload is not an object: {other}",
                    rec.seq, rec.event_type
                ))
            }
        };
        obj.insert("type".into(), Value::String(rec.event_type.to_string()));
        serde_json::from_value(Value::Object(obj)).map_err(|e| {
            format!(
                "event {} ({}) schema v{}: {e}",
                rec.seq, rec.event_type, rec.schema_version
            )
        })
    }
}

/// Where schema changes are absorbed: rewrite an old payload into the current
/// shape. Version 1 is current for every type, so nothing to do yet.
fn upcast(_event_type: &str, _schema_version: u32, payload: Value) -> Value {
    payload
}

/// Stream names, in one place.
pub mod streams {
    use uuid::Uuid;
    pub fn experiment(id: Uuid) -> String {
        format!("experiment-{id}")
    }
    pub fn job(id: Uuid) -> String {
        format!("job-{id}")
    }
    pub const ARTIFACTS: &str = "artifacts";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
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
        }
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::parse(s).ok_or_else(|| {
            format!("status {s:?} is not queued, running, succeeded, failed or cancelled")
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
    pub outputs: BTreeMap<String, String>,
    /// Last value and step of each metric.
    pub last_metrics: BTreeMap<String, (u64, f64)>,
    pub metric_points: u64,
    pub summary: Value,
    pub error: Option<String>,
    pub submitted_seq: u64,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub last_seq: u64,
    pub experiments: BTreeMap<Uuid, ExperimentView>,
    pub rounds: BTreeMap<Uuid, RoundView>,
    pub jobs: BTreeMap<Uuid, JobView>,
    pub artifacts: BTreeMap<String, ArtifactView>,
    /// job -> metric name -> (step, value) in logging order.
    pub series: BTreeMap<Uuid, BTreeMap<String, Vec<(u64, f64)>>>,
    /// Events of types this version does not know (written by a newer herd).
    pub unknown_events: u64,
    /// Events that did not decode, with the reason (never silently dropped).
    pub undecodable: Vec<(u64, String)>,
}

impl Projection {
    /// Fold one event. Events must come in sequence order; repeats are ignored.
    pub fn apply(&mut self, rec: &Stored) {
        if rec.seq <= self.last_seq {
            return;
        }
        self.last_seq = rec.seq;
        let event = match HerdEvent::from_recorded(rec) {
            Ok(e) => e,
            Err(reason) => {
                self.undecodable.push((rec.seq, reason));
                return;
            }
        };
        let ts = rec.timestamp_ms;
        match event {
            HerdEvent::ExperimentCreated {
                experiment,
                name,
                description,
            } => {
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
                self.artifacts.entry(hash.clone()).or_insert(ArtifactView {
                    hash,
                    artifact,
                    name,
                    summary,
                    produced_by: None,
                    recorded_seq: rec.seq,
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
                }
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
            } => {
                if let Some(e) = experiment.and_then(|x| self.experiments.get_mut(&x)) {
                    e.jobs.push(job);
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
                        outputs: BTreeMap::new(),
                        last_metrics: BTreeMap::new(),
                        metric_points: 0,
                        summary: Value::Null,
                        error: None,
                        submitted_seq: rec.seq,
                        submitted_ms: ts,
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
                ..
            } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    // A new attempt starts its curves afresh: the views show
                    // the latest attempt (earlier ones stay in the log).
                    if attempt > 1 {
                        self.series.remove(&job);
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
                    let series = self.series.entry(job).or_default();
                    j.metric_points += points.len() as u64;
                    for p in points {
                        // Look up before inserting: no key allocation for known names.
                        match j.last_metrics.get_mut(&p.name) {
                            Some(last) => *last = (p.step, p.value),
                            None => {
                                j.last_metrics.insert(p.name.clone(), (p.step, p.value));
                            }
                        }
                        match series.get_mut(&p.name) {
                            Some(s) => s.push((p.step, p.value)),
                            None => {
                                series.insert(p.name, vec![(p.step, p.value)]);
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
                self.artifacts.entry(hash.clone()).or_insert(ArtifactView {
                    hash,
                    artifact,
                    name,
                    summary,
                    produced_by: Some(job),
                    recorded_seq: rec.seq,
                });
            }
            HerdEvent::JobSucceeded { job, summary } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.status = JobStatus::Succeeded;
                    j.summary = summary;
                    j.finished_ms = Some(ts);
                }
            }
            HerdEvent::JobFailed { job, reason } | HerdEvent::JobCancelled { job, reason } => {
                let cancelled = rec.event_type == "JobCancelled";
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.status = if cancelled {
                        JobStatus::Cancelled
                    } else {
                        JobStatus::Failed
                    };
                    j.error = Some(reason);
                    j.finished_ms = Some(ts);
                }
            }
            HerdEvent::JobInterrupted { job, reason } => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.status = JobStatus::Queued;
                    j.error = Some(reason);
                }
            }
            HerdEvent::Unknown { .. } => self.unknown_events += 1,
        }
    }

    /// The lineage tree of an artifact, back to imported data and models.
    pub fn lineage(&self, hash: &str) -> Option<LineageNode> {
        self.lineage_inner(hash, &mut BTreeSet::new())
    }

    fn lineage_inner(&self, hash: &str, seen: &mut BTreeSet<String>) -> Option<LineageNode> {
        let a = self.artifacts.get(hash)?;
        let mut node = LineageNode {
            hash: hash.to_string(),
            artifact: Some(a.artifact),
            name: a.name.clone(),
            job: None,
        };
        if !seen.insert(hash.to_string()) {
            return Some(node); // a cycle cannot happen with content hashes, but never loop
        }
        if let Some(job) = a.produced_by.and_then(|id| self.jobs.get(&id)) {
            let mut inputs = BTreeMap::new();
            let from = if job.resolved_inputs.is_empty() {
                &job.inputs
            } else {
                &job.resolved_inputs
            };
            for (name, h) in from {
                let child = self.lineage_inner(h, seen).unwrap_or(LineageNode {
                    hash: h.clone(),
                    artifact: None, // not recorded (an older herd, or a raw blob)
                    name: name.clone(),
                    job: None,
                });
                inputs.insert(name.clone(), child);
            }
            node.job = Some(LineageJob {
                id: job.id,
                kind: job.kind,
                name: job.name.clone(),
                inputs,
            });
        }
        seen.remove(hash);
        Some(node)
    }
}
