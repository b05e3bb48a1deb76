//! Job inputs as typed references, parsed once at the edge.
//!
//! An input is either a content hash (an imported artifact or a job's
//! output) or `job:<id>/<output>`, an output of a job that may not have run
//! yet. Both are checked at submit, inside round specs too: the reference
//! must parse, point at something that exists, and be the kind of artifact
//! the input needs, so that a dataset given as a checkpoint is refused
//! before anything is recorded or run.

use std::collections::BTreeMap;

use crate::state::Live;
use uuid::Uuid;

use crate::jobs::{self, ArtifactKind, JobKind};

pub use herd_core::InputRef;

/// A job not yet recorded (planned in the same round): its kind and inputs.
pub struct Planned<'a> {
    pub kind: JobKind,
    pub inputs: &'a BTreeMap<String, String>,
}

/// The artifact kind a reference points at, looking at recorded artifacts
/// and jobs and at `planned` jobs of a round being submitted.
pub fn artifact_kind(
    p: &Live,
    planned: &BTreeMap<Uuid, Planned>,
    reference: &str,
) -> Result<ArtifactKind, String> {
    artifact_kind_at(p, planned, reference, 0)
}

fn artifact_kind_at(
    p: &Live,
    planned: &BTreeMap<Uuid, Planned>,
    reference: &str,
    depth: usize,
) -> Result<ArtifactKind, String> {
    // Curate outputs take their input's kind: follow at most this far.
    if depth > 64 {
        return Err(format!("{reference}: reference chain too long"));
    }
    match reference.parse::<InputRef>()? {
        InputRef::Blob(hash) => match p.artifacts.get(hash.as_str()) {
            Some(a) => Ok(a.artifact),
            None => Err(format!(
                "{hash} is not an imported artifact or job output (import it with `herd import`)"
            )),
        },
        InputRef::JobOutput { job, output } => {
            let (kind, inputs, recorded) = if let Some(j) = planned.get(&job) {
                (j.kind, j.inputs.clone(), None)
            } else if let Some(j) = p.job(job).map_err(|e| e.to_string())? {
                (j.kind, j.inputs.clone(), j.outputs.get(&output).cloned())
            } else {
                return Err(format!("{reference}: no job {job}"));
            };
            if let Some(a) = recorded.and_then(|h| p.artifacts.get(&h)) {
                return Ok(a.artifact);
            }
            jobs::output_kind(kind, &output, &inputs, |r| {
                artifact_kind_at(p, planned, r, depth + 1).ok()
            })
            .ok_or_else(|| {
                format!(
                    "{reference}: a {} job has no output `{output}` (its outputs: {})",
                    kind.as_str(),
                    jobs::output_names(kind).join(", ")
                )
            })
        }
    }
}

/// Check every input of a job: the reference parses, exists and is the
/// artifact kind the input needs. Errors name the input.
pub fn check_inputs(
    p: &Live,
    planned: &BTreeMap<Uuid, Planned>,
    kind: JobKind,
    inputs: &BTreeMap<String, String>,
) -> Result<(), String> {
    jobs::check_inputs(kind, inputs)?;
    let mut kinds: Vec<(&str, ArtifactKind)> = vec![];
    for (name, reference) in inputs {
        let artifact =
            artifact_kind(p, planned, reference).map_err(|e| format!("input `{name}`: {e}"))?;
        jobs::check_input_kind(kind, name, artifact)?;
        kinds.push((name, artifact));
    }
    // A job whose output takes its inputs' kind needs them all of one kind.
    let same_as_inputs = jobs::recipe(kind)?
        .outputs()
        .iter()
        .any(|(_, of)| matches!(of, jobs::OutputKind::SameAsInputs));
    if same_as_inputs {
        if let Some((name, other)) = kinds.iter().find(|(_, a)| *a != kinds[0].1) {
            return Err(format!(
                "a {kind} job takes datasets of one kind: `{}` is {}, `{name}` is {other}",
                kinds[0].0, kinds[0].1
            ));
        }
    }
    Ok(())
}
