//! One attempt's worker messages, turned into events as they arrive, and
//! the event that ends it. Whatever the executor, this is the fold.

use std::collections::BTreeMap;

use anyhow::Result;
use herd_core::model::{streams, HerdEvent, MetricPoint};
use uuid::Uuid;

use crate::executor::Ending;
use crate::state::{Progress, State};
use crate::worker::WorkerMessage;

pub(super) struct Attempt {
    pub(super) id: Uuid,
    pub(super) attempt: u32,
    adapter_base: Option<String>,
    /// Re-attached: the last step of each metric and the outputs the log
    /// already holds for this attempt (a replayed message adds only what
    /// is new).
    pub(super) recorded_steps: BTreeMap<String, u64>,
    pub(super) recorded_outputs: BTreeMap<String, String>,
    notes: Vec<String>,
    done: Option<serde_json::Value>,
    failed: Option<String>,
}

/// How an attempt ended, all told: the scheduler's reasons come before
/// the executor's.
pub(super) enum Outcome {
    Cancelled,
    /// The daemon shut down with a worker that dies with it: requeued.
    Interrupted(String),
    Executor(Ending),
}

impl Attempt {
    pub(super) fn new(
        id: Uuid,
        attempt: u32,
        adapter_base: Option<String>,
        notes: Vec<String>,
    ) -> Self {
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

    pub(super) async fn apply(&mut self, state: &State, line: &str) -> Result<()> {
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

    /// The event that ends the attempt. A lost attempt (a node failed) runs
    /// again while fewer than `max_attempts` were made.
    pub(super) fn finish(self, state: &State, outcome: Outcome, max_attempts: u32) -> HerdEvent {
        let id = self.id;
        match outcome {
            Outcome::Cancelled => HerdEvent::JobCancelled {
                job: id,
                reason: "cancelled by request".into(),
            },
            Outcome::Interrupted(reason) => HerdEvent::JobInterrupted {
                job: id,
                reason,
                requeued: true,
            },
            Outcome::Executor(Ending::Lost(reason)) if self.attempt < max_attempts => {
                HerdEvent::JobInterrupted {
                    job: id,
                    reason: format!(
                        "{}; requeued (attempt {} of {max_attempts})",
                        state.without_server_paths(&reason),
                        self.attempt
                    ),
                    requeued: true,
                }
            }
            Outcome::Executor(Ending::Lost(reason)) => HerdEvent::JobFailed {
                job: id,
                reason: format!(
                    "{}; not requeued: that was attempt {} of {max_attempts}",
                    state.without_server_paths(&reason),
                    self.attempt
                ),
            },
            Outcome::Executor(Ending::EndedBy(reason)) => HerdEvent::JobFailed {
                job: id,
                reason: state.without_server_paths(&reason),
            },
            Outcome::Executor(Ending::Ended { ok, how }) => match (self.done, ok) {
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
