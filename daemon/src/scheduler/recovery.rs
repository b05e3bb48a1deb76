//! At start: the jobs a previous daemon left running. An executor whose
//! jobs outlive the daemon gets them back (re-attached by the handle in
//! the record); otherwise their workers died with it and they are requeued
//! (at most `max_attempts` attempts) or failed. One started by an executor
//! this daemon does not run is stopped there and requeued here.

use std::sync::Arc;

use anyhow::Result;
use herd_core::model::{streams, ExecutorHandle, HerdEvent, JobStatus, JobView};
use tokio::sync::oneshot;

use super::attempt::Attempt;
use super::{Claim, Scheduler};
use crate::executor;

impl Scheduler {
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let stuck: Vec<JobView> = {
            let p = self.state.projection.read().await;
            p.jobs
                .values()
                .filter(|j| j.status == JobStatus::Running && j.kind.is_recipe())
                .cloned()
                .collect()
        };
        let here = self.config.executor.name();
        for j in stuck {
            let event = match &j.executor {
                Some(h) if h.executor == here && self.config.executor.survives_restart() => {
                    self.reattach(&j, h).await?;
                    continue;
                }
                Some(h) if h.executor != here => {
                    let h = h.clone();
                    let stopped =
                        tokio::task::spawn_blocking(move || executor::stop_elsewhere(&h)).await?;
                    HerdEvent::JobInterrupted {
                        job: j.id,
                        reason: format!(
                            "this job ran on the {} executor but the daemon now runs --executor {here} ({stopped}); requeued",
                            j.executor.as_ref().map_or("?", |h| h.executor.as_str())
                        ),
                        requeued: true,
                    }
                }
                _ if j.attempts >= self.config.max_attempts => HerdEvent::JobFailed {
                    job: j.id,
                    reason: format!(
                        "interrupted {} times (daemon restarts); giving up",
                        j.attempts
                    ),
                },
                _ => HerdEvent::JobInterrupted {
                    job: j.id,
                    reason: "the daemon stopped while this job was running; requeued".into(),
                    requeued: true,
                },
            };
            self.state.record_one(&streams::job(j.id), event).await?;
        }
        Ok(())
    }

    /// Follow an attempt a previous daemon started, from its first message,
    /// recording only what the log does not hold yet.
    async fn reattach(self: &Arc<Self>, job: &JobView, handle: &ExecutorHandle) -> Result<()> {
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
        let follow = self
            .config
            .executor
            .reattach(job, handle, self.state.work_dir(job.id))
            .await?;
        let slot = match self.claim_slot(job.id) {
            Claim::Slot(slot) => Some(slot),
            Claim::Full | Claim::Taken => None,
        };
        tracing::info!("job {}: re-attached to {handle}", job.id);
        let (kill_tx, kill_rx) = oneshot::channel();
        self.arm(job.id, kill_tx, None);
        self.spawn_follow(attempt, follow, kill_rx, slot);
        Ok(())
    }
}
