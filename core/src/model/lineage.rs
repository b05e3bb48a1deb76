//! Lineage: an artifact's tree back to imported data and models, read
//! from the projection (and the view store, for evicted jobs). Not part of
//! the fold, so not in `VIEWS_VERSION`.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use super::views::{JobView, LineageJob, LineageNode, Projection};

impl Projection {
    /// The lineage tree of an artifact, back to imported data and models.
    /// `job` finds a job's view (resident or stored).
    pub fn lineage(
        &self,
        hash: &str,
        job: &dyn Fn(Uuid) -> Option<JobView>,
    ) -> Option<LineageNode> {
        self.lineage_inner(hash, job, &mut BTreeSet::new())
    }

    fn lineage_inner(
        &self,
        hash: &str,
        load: &dyn Fn(Uuid) -> Option<JobView>,
        seen: &mut BTreeSet<String>,
    ) -> Option<LineageNode> {
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
        if let Some(job) = a.produced_by.and_then(load) {
            let mut inputs = BTreeMap::new();
            let from = if job.resolved_inputs.is_empty() {
                &job.inputs
            } else {
                &job.resolved_inputs
            };
            for (name, h) in from {
                let child = self.lineage_inner(h, load, seen).unwrap_or(LineageNode {
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
