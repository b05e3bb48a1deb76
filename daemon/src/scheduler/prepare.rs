//! What every executor needs before a worker can start: `job:` inputs
//! resolved to hashes, checkpoints materialized (verified), the effective
//! hyperparameters, a fresh work directory and the job file; and the
//! `JobStarted` event that records it all.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use herd_core::model::{HerdEvent, JobView};
use herd_core::InputRef;
use uuid::Uuid;

use super::Scheduler;
use crate::executor::{Placement, Started};
use crate::jobs::{self, InputSource};
use crate::state::State;
use crate::worker::JobFile;

/// What starting a job needs, whichever executor runs it.
pub(super) struct Prepared {
    pub(super) resolved: BTreeMap<String, String>,
    pub(super) adapter_base: Option<String>,
    pub(super) effective: serde_json::Value,
    pub(super) inputs: BTreeMap<String, PathBuf>,
    pub(super) workdir: PathBuf,
    /// Said by the scheduler itself (which inputs an `average` kept).
    pub(super) notes: Vec<String>,
}

impl Scheduler {
    /// Resolve `job:<id>/<output>` references to hashes.
    pub(super) fn resolve(
        job: &JobView,
        jobs: &BTreeMap<Uuid, JobView>,
    ) -> Result<BTreeMap<String, String>> {
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
    pub(super) async fn prepare(
        &self,
        job: &JobView,
        jobs: &BTreeMap<Uuid, JobView>,
    ) -> Result<Prepared> {
        let kind = job.kind;
        // Resolved once, at submit: the recorded set is the effective one.
        // Nothing is merged again here, so a daemon whose defaults changed
        // runs a queued job as it was recorded (or refuses it, saying why).
        let recipe = jobs::recipe(kind).map_err(|e| anyhow!(e))?;
        let effective = job.hyperparameters.clone();
        recipe.check(&effective).map_err(|e| {
            anyhow!("its recorded hyperparameters no longer pass this herd's checks: {e}")
        })?;
        let mut resolved = Self::resolve(job, jobs)?;
        // The recipe may keep only some inputs (average's top_k).
        let source = |name: &str| {
            let Ok(InputRef::JobOutput { job: src, .. }) =
                job.inputs.get(name)?.parse::<InputRef>()
            else {
                return None;
            };
            jobs.get(&src).map(|v| InputSource {
                job: v.id,
                name: v.name.clone(),
                last_metrics: v.last_metrics.clone(),
            })
        };
        let notes: Vec<String> = recipe
            .choose_inputs(&effective, &mut resolved, &source)?
            .into_iter()
            .collect();
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

    pub(super) fn write_job_file(
        job: &JobView,
        p: &Prepared,
        placement: &Placement,
        blobs_dir: PathBuf,
    ) -> Result<PathBuf> {
        let (device, threads) = (placement.device.as_str(), placement.threads);
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

    pub(super) fn started_event(
        job: &JobView,
        p: &Prepared,
        placement: &Placement,
        started: &Started,
    ) -> HerdEvent {
        let (device, threads) = (placement.device.as_str(), placement.threads);
        HerdEvent::JobStarted {
            job: job.id,
            attempt: job.attempts + 1,
            device: device.to_string(),
            pid: started.pid,
            executor: Some(started.handle.clone()),
            slurm_job: None,
            engine_version: herd_engine::ENGINE_VERSION.into(),
            threads: threads as u32,
            resolved_inputs: p.resolved.clone(),
            effective_hyperparameters: p.effective.clone(),
            fingerprint: herd_engine::fingerprint(device, threads),
        }
    }
}
