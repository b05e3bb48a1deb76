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

/// A job not yet recorded (planned in the same round): its kind, inputs and
/// hyperparameters.
pub struct Planned<'a> {
    pub kind: JobKind,
    pub inputs: &'a BTreeMap<String, String>,
    pub hyperparameters: &'a serde_json::Value,
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
            let (kind, inputs, hyperparameters, recorded) = if let Some(j) = planned.get(&job) {
                (j.kind, j.inputs.clone(), j.hyperparameters.clone(), None)
            } else if let Some(j) = p.job(job).map_err(|e| e.to_string())? {
                (
                    j.kind,
                    j.inputs.clone(),
                    j.hyperparameters.clone(),
                    j.outputs.get(&output).cloned(),
                )
            } else {
                return Err(format!("{reference}: no job {job}"));
            };
            if let Some(a) = recorded.and_then(|h| p.artifacts.get(&h)) {
                return Ok(a.artifact);
            }
            let kind_of = |r: &str| artifact_kind_at(p, planned, r, depth + 1).ok();
            jobs::output_kind(kind, &output, &inputs, &hyperparameters, kind_of).ok_or_else(|| {
                format!(
                    "{reference}: this {} job makes no output `{output}` (it makes: {})",
                    kind.as_str(),
                    jobs::outputs_made(kind, &inputs, &hyperparameters, kind_of).join(", ")
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
    adapter_base(p, inputs)?;
    // A job whose output takes its inputs' kind needs them all of one kind.
    let same_as_inputs = jobs::recipe(kind)?.outputs().iter().any(|(_, of)| {
        matches!(
            of,
            jobs::OutputKind::SameAsInputs | jobs::OutputKind::WhenInputsAre(_)
        )
    });
    if same_as_inputs {
        if let Some((name, other)) = kinds.iter().find(|(_, a)| *a != kinds[0].1) {
            return Err(format!(
                "a {kind} job takes inputs of one kind: `{}` is {}, `{name}` is {other}",
                kinds[0].0, kinds[0].1
            ));
        }
    }
    Ok(())
}

/// The checkpoint a job's adapters adapt, checked: each adapter input's
/// recorded `base` must be the job's `model` input, or, in a job without
/// one (average), the same for every adapter. Returns `model` when the job
/// has one, else the adapters' common base (what an adapter the job makes
/// adapts). Inputs not resolved yet (job references) are skipped here and
/// checked when the job starts.
pub fn adapter_base(p: &Live, inputs: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let mut base: Option<(String, String)> = inputs
        .get("model")
        .filter(|m| herd_core::BlobHash::is_valid(m))
        .map(|m| ("model".to_string(), m.clone()));
    for (name, reference) in inputs {
        let Some(a) = p.artifacts.get(reference) else {
            continue;
        };
        if a.artifact != ArtifactKind::Adapter {
            continue;
        }
        let Some(adapts) = a.summary.get("base").and_then(|b| b.as_str()) else {
            return Err(format!(
                "input `{name}`: adapter {reference} has no recorded base"
            ));
        };
        match &base {
            None => base = Some((name.clone(), adapts.to_string())),
            Some((from, hash)) if hash != adapts => {
                return Err(if from == "model" {
                    format!("input `{name}` is an adapter of checkpoint {adapts}, but `model` is {hash}: give the checkpoint it adapts")
                } else {
                    format!("input `{name}` is an adapter of checkpoint {adapts}, but `{from}` adapts {hash}: only adapters of one base average")
                });
            }
            Some(_) => {}
        }
    }
    Ok(base.map(|b| b.1))
}
