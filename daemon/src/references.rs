//! Job inputs as typed references, parsed once at the edge.
//!
//! An input is either a content hash (an imported artifact or a job's
//! output) or `job:<id>/<output>`, an output of a job that may not have run
//! yet. Both are checked at submit, inside round specs too: the reference
//! must parse, point at something that exists, and be the kind of artifact
//! the input needs, so that a dataset given as a checkpoint is refused
//! before anything is recorded or run.

use std::collections::BTreeMap;

use herd_core::Projection;
use uuid::Uuid;

use crate::jobs::{self, JobKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputRef {
    /// A blob by its sha256 (64 lowercase hex digits).
    Blob(String),
    /// Output `output` of job `job`.
    JobOutput { job: Uuid, output: String },
}

impl InputRef {
    pub fn parse(s: &str) -> Result<InputRef, String> {
        if let Some(rest) = s.strip_prefix("job:") {
            let (id, output) = rest
                .split_once('/')
                .ok_or_else(|| format!("{s:?} is not job:<id>/<output>"))?;
            let job = id
                .parse::<Uuid>()
                .map_err(|_| format!("{s:?}: {id:?} is not a job id"))?;
            if output.is_empty()
                || !output
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("{s:?}: {output:?} is not an output name"));
            }
            return Ok(InputRef::JobOutput {
                job,
                output: output.to_string(),
            });
        }
        if is_hash(s) {
            return Ok(InputRef::Blob(s.to_string()));
        }
        Err(format!(
            "{s:?} is neither a content hash (64 lowercase hex digits) nor job:<id>/<output>"
        ))
    }
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InputRef::Blob(h) => f.write_str(h),
            InputRef::JobOutput { job, output } => write!(f, "job:{job}/{output}"),
        }
    }
}

/// A content hash as the blob store names blobs: lowercase only.
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A job not yet recorded (planned in the same round): its kind and inputs.
pub struct Planned<'a> {
    pub kind: JobKind,
    pub inputs: &'a BTreeMap<String, String>,
}

/// The artifact kind a reference points at, looking at recorded artifacts
/// and jobs and at `planned` jobs of a round being submitted.
pub fn artifact_kind(
    p: &Projection,
    planned: &BTreeMap<Uuid, Planned>,
    reference: &str,
) -> Result<String, String> {
    artifact_kind_at(p, planned, reference, 0)
}

fn artifact_kind_at(
    p: &Projection,
    planned: &BTreeMap<Uuid, Planned>,
    reference: &str,
    depth: usize,
) -> Result<String, String> {
    // Curate outputs take their input's kind: follow at most this far.
    if depth > 64 {
        return Err(format!("{reference}: reference chain too long"));
    }
    match InputRef::parse(reference)? {
        InputRef::Blob(hash) => match p.artifacts.get(&hash) {
            Some(a) => Ok(a.artifact.clone()),
            None => Err(format!(
                "{hash} is not an imported artifact or job output (import it with `herd import`)"
            )),
        },
        InputRef::JobOutput { job, output } => {
            let (kind, inputs, recorded) = if let Some(j) = planned.get(&job) {
                (j.kind, j.inputs.clone(), None)
            } else if let Some(j) = p.jobs.get(&job) {
                let kind = JobKind::parse(&j.kind)?;
                (kind, j.inputs.clone(), j.outputs.get(&output).cloned())
            } else {
                return Err(format!("{reference}: no job {job}"));
            };
            if let Some(a) = recorded.and_then(|h| p.artifacts.get(&h)) {
                return Ok(a.artifact.clone());
            }
            kind.output_kind(&output, |input| {
                let r = inputs.get(input)?;
                artifact_kind_at(p, planned, r, depth + 1).ok()
            })
            .ok_or_else(|| {
                format!(
                    "{reference}: a {} job has no output `{output}` (its outputs: {})",
                    kind.as_str(),
                    kind.outputs().join(", ")
                )
            })
        }
    }
}

/// Check every input of a job: the reference parses, exists and is the
/// artifact kind the input needs. Errors name the input.
pub fn check_inputs(
    p: &Projection,
    planned: &BTreeMap<Uuid, Planned>,
    kind: JobKind,
    inputs: &BTreeMap<String, String>,
) -> Result<(), String> {
    jobs::check_inputs(kind, inputs)?;
    for (name, reference) in inputs {
        let artifact =
            artifact_kind(p, planned, reference).map_err(|e| format!("input `{name}`: {e}"))?;
        jobs::check_input_kind(kind, name, &artifact)?;
    }
    Ok(())
}
