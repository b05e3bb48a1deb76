//! The typed events: everything herd records, how each is encoded for the
//! log and decoded (with upcasting) from it, and the stream names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::vocab::{ArtifactKind, JobKind, Resources};

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

/// `JobMetrics` as stored: fields in the order a JSON tree writes them
/// (sorted), so both encodings give the same bytes.
#[derive(Serialize)]
struct MetricsPayload<'a> {
    attempt: u32,
    job: &'a Uuid,
    points: PointsPayload<'a>,
}

struct PointsPayload<'a>(&'a [MetricPoint]);

impl Serialize for PointsPayload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Point<'a> {
            name: &'a str,
            step: u64,
            value: crate::number::Number,
        }
        s.collect_seq(self.0.iter().map(|p| Point {
            name: &p.name,
            step: p.step,
            value: crate::number::Number(p.value),
        }))
    }
}

/// One metric value at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    pub name: String,
    #[serde(with = "crate::number::value")]
    pub value: f64,
}

/// An attempt as its executor knows it: the executor's name and the
/// attempt's id there (a Slurm job id, a process id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorHandle {
    pub executor: String,
    pub id: String,
}

impl std::fmt::Display for ExecutorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.executor, self.id)
    }
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
        /// What the job asks of a cluster executor, over the daemon's
        /// defaults for its kind (none: the defaults).
        #[serde(default, skip_serializing_if = "Resources::is_empty")]
        resources: Resources,
    },
    JobStarted {
        job: Uuid,
        attempt: u32,
        device: String,
        #[serde(default)]
        pid: Option<u32>,
        /// Which executor runs the attempt, and its id there (a Slurm job
        /// id, a process id): what a restarted daemon re-attaches by.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        executor: Option<ExecutorHandle>,
        /// Written by herd before `executor` (the Slurm job id); read as
        /// `executor: {executor: "slurm", id}`. Never written now.
        #[serde(default, skip_serializing)]
        slurm_job: Option<u64>,
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
    /// The process running the job died with the daemon; it goes back to
    /// the queue. Unless `requeued` is false: `herdd repair` lost the job's
    /// later events, so it ends here, visibly, and runs again only when
    /// resubmitted.
    JobInterrupted {
        job: Uuid,
        reason: String,
        #[serde(default = "requeued_by_default")]
        requeued: bool,
    },
    /// Parameters and tags an external run logged after it opened
    /// (MLflow's `log-parameter`, `set-tag`, `log-batch`): added to its
    /// hyperparameters and tags. A parameter, once logged, never changes
    /// (the API refuses another value before anything is recorded).
    RunLogged {
        job: Uuid,
        #[serde(default)]
        params: BTreeMap<String, Value>,
        #[serde(default)]
        tags: BTreeMap<String, String>,
    },
    /// `herdd repair --accept-loss` set damaged events aside (or found
    /// acknowledged ones missing): the record says so from here on.
    HistoryRepaired {
        /// The events lost, first and last sequence.
        first_lost: u64,
        last_lost: u64,
        /// How many of them the index recorded as acknowledged.
        acknowledged_lost: u64,
        reason: String,
        /// Where the set-aside records are, relative to the data directory.
        #[serde(default)]
        quarantine_file: Option<String>,
        /// Jobs whose later events may be among the lost: marked
        /// interrupted (never re-run on their own).
        #[serde(default)]
        interrupted_jobs: Vec<Uuid>,
    },
    #[serde(skip)]
    Unknown {
        event_type: String,
        payload: Value,
    },
}

impl HerdEvent {
    /// The job an event is about, if any.
    pub fn job(&self) -> Option<Uuid> {
        match self {
            HerdEvent::JobSubmitted { job, .. }
            | HerdEvent::JobStarted { job, .. }
            | HerdEvent::JobMetrics { job, .. }
            | HerdEvent::JobOutput { job, .. }
            | HerdEvent::JobSucceeded { job, .. }
            | HerdEvent::JobFailed { job, .. }
            | HerdEvent::JobCancelled { job, .. }
            | HerdEvent::JobInterrupted { job, .. }
            | HerdEvent::RunLogged { job, .. } => Some(*job),
            HerdEvent::ExperimentCreated { .. }
            | HerdEvent::ArtifactImported { .. }
            | HerdEvent::RoundSubmitted { .. }
            | HerdEvent::HistoryRepaired { .. }
            | HerdEvent::Unknown { .. } => None,
        }
    }

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
            HerdEvent::RunLogged { .. } => "RunLogged",
            HerdEvent::HistoryRepaired { .. } => "HistoryRepaired",
            HerdEvent::Unknown { .. } => "Unknown",
        }
    }

    /// What to append: the type and schema version go in the record's
    /// envelope, the fields in its payload.
    pub fn encode(&self) -> Encoded {
        // The hot type (metric batches) is written straight to text, the
        // same bytes as the general path below, without a JSON tree of
        // small maps for every point.
        if let HerdEvent::JobMetrics {
            job,
            attempt,
            points,
        } = self
        {
            return Encoded {
                event_type: self.type_name(),
                schema_version: SCHEMA_VERSION,
                payload: serde_json::value::to_raw_value(&MetricsPayload {
                    attempt: *attempt,
                    job,
                    points: PointsPayload(points),
                })
                .expect("metric batches serialize"),
            };
        }
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
            "RunLogged",
            "HistoryRepaired",
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

fn requeued_by_default() -> bool {
    true
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
    /// Events about the record itself (repairs).
    pub const HISTORY: &str = "history";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_batches_encode_as_the_general_path_does_and_read_back() {
        let event = HerdEvent::JobMetrics {
            job: Uuid::from_u128(42),
            attempt: 2,
            points: vec![
                MetricPoint {
                    step: 1,
                    name: "loss".into(),
                    value: 0.25,
                },
                MetricPoint {
                    step: 2,
                    name: "q\"uote".into(),
                    value: 3.0,
                },
                MetricPoint {
                    step: 3,
                    name: "loss".into(),
                    value: f64::NAN,
                },
                MetricPoint {
                    step: 4,
                    name: "lr".into(),
                    value: 1e-300,
                },
            ],
        };
        let fast = event.encode();
        let mut tree = serde_json::to_value(&event).unwrap();
        tree.as_object_mut().unwrap().remove("type");
        assert_eq!(fast.payload.get(), serde_json::to_string(&tree).unwrap());
        let back = HerdEvent::from_recorded(&Stored {
            seq: 1,
            timestamp_ms: 0,
            event_type: "JobMetrics",
            schema_version: SCHEMA_VERSION,
            payload: fast.payload.get(),
        })
        .unwrap();
        let HerdEvent::JobMetrics { points, .. } = back else {
            panic!()
        };
        assert!(points[2].value.is_nan());
        assert_eq!(points[3].value, 1e-300);
    }
}
