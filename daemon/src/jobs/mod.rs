//! The Llama 3 recipes as jobs.
//!
//! A job is a pure function of what it records: kind, inputs (by content
//! hash), effective hyperparameters and seed. It runs the same in-process
//! (tests) and in a worker process (the daemon), and reports through a
//! [`Sink`]: per-step metrics, progress, outputs, notes.
//!
//! Hyperparameters are validated before anything runs: an unknown name or a
//! wrong type is refused, naming the field, and the effective set (defaults
//! filled in) is what gets recorded.

mod annotate;
mod average;
mod curate;
mod dpo;
mod eval;
mod generation;
mod inputs;
mod rm;
mod sample;
mod sft;
mod sink;
mod training;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use generation::{complete, score, GenParams};
pub use inputs::{chat_of, load_dataset, prompt_completion, save_dataset, similarity, truncate};
pub use sink::{store_output, MemorySink, Sink};
pub use training::{in_range, limits, save_checkpoint, train_loop, TrainParams};

pub use herd_core::{ArtifactKind, JobKind};

/// What herd knows about each kind it runs: its inputs and the artifact kind
/// each needs, its outputs, its hyperparameters. Implemented for `JobKind`
/// (the vocabulary lives in herd-core; what a kind *means* lives here).
pub trait Recipe: Copy {
    /// (required, optional) input names. `average` takes any names.
    fn inputs(self) -> (&'static [&'static str], &'static [&'static str]);
    /// Which hyperparameters this kind takes, with defaults.
    fn default_hyperparameters(self) -> Value;
    /// The artifact kinds input `name` accepts.
    fn accepts(self, input: &str) -> &'static [ArtifactKind];
    /// The artifact kind of output `name`; `input_kind` tells the kind of
    /// one of the job's inputs (curate keeps its data's kind). None: no
    /// such output.
    fn output_kind(
        self,
        output: &str,
        input_kind: impl Fn(&str) -> Option<ArtifactKind>,
    ) -> Option<ArtifactKind>;
    /// The output names this kind records.
    fn outputs(self) -> &'static [&'static str];
}

impl Recipe for JobKind {
    fn inputs(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            JobKind::Rm => (&["model", "data"], &[]),
            JobKind::Sample => (&["policy", "rm", "prompts"], &[]),
            JobKind::Sft => (&["model", "data"], &[]),
            JobKind::Dpo => (&["model", "data"], &["reference"]),
            JobKind::Average => (&[], &[]),
            JobKind::Curate => (&["data"], &["rm"]),
            JobKind::Eval => (
                &["policy"],
                &["baseline", "rm", "prompts", "sft", "preference"],
            ),
            JobKind::Annotate => (&["policy", "prompts"], &["other"]),
            JobKind::External => (&[], &[]),
        }
    }

    fn default_hyperparameters(self) -> Value {
        match self {
            JobKind::Rm => to_value(rm::Params::default()),
            JobKind::Sample => to_value(sample::Params::default()),
            JobKind::Sft => to_value(sft::Params::default()),
            JobKind::Dpo => to_value(dpo::Params::default()),
            JobKind::Average => to_value(average::Params::default()),
            JobKind::Curate => to_value(curate::Params::default()),
            JobKind::Eval => to_value(eval::Params::default()),
            JobKind::Annotate => to_value(annotate::Params::default()),
            JobKind::External => Value::Object(Map::new()),
        }
    }

    fn accepts(self, input: &str) -> &'static [ArtifactKind] {
        use ArtifactKind::*;
        match (self, input) {
            (JobKind::External, _) => &[],
            (JobKind::Rm | JobKind::Dpo, "data") => &[Preference],
            (JobKind::Sft, "data") => &[Sft],
            (JobKind::Curate, "data") => &[Sft, Preference],
            (JobKind::Sample | JobKind::Annotate | JobKind::Eval, "prompts") => &[Prompts],
            (JobKind::Eval, "sft") => &[Sft],
            (JobKind::Eval, "preference") => &[Preference],
            _ => &[Checkpoint],
        }
    }

    fn output_kind(
        self,
        output: &str,
        input_kind: impl Fn(&str) -> Option<ArtifactKind>,
    ) -> Option<ArtifactKind> {
        use ArtifactKind::*;
        match (self, output) {
            (JobKind::Rm | JobKind::Sft | JobKind::Dpo | JobKind::Average, "checkpoint") => {
                Some(Checkpoint)
            }
            (JobKind::Dpo, "reference_logps") => Some(Cache),
            (JobKind::Sample, "data") => Some(Sft),
            (JobKind::Annotate, "data") => Some(Preference),
            (JobKind::Curate, "data") => input_kind("data"),
            _ => None,
        }
    }

    fn outputs(self) -> &'static [&'static str] {
        match self {
            JobKind::Rm | JobKind::Sft | JobKind::Average => &["checkpoint"],
            JobKind::Dpo => &["checkpoint", "reference_logps"],
            JobKind::Sample | JobKind::Annotate | JobKind::Curate => &["data"],
            JobKind::Eval | JobKind::External => &[],
        }
    }
}

fn to_value<T: Serialize>(t: T) -> Value {
    serde_json::to_value(t).expect("params serialize")
}

/// Input `name` of a `kind` job may be an artifact of kind `artifact`.
pub fn check_input_kind(kind: JobKind, name: &str, artifact: ArtifactKind) -> Result<(), String> {
    let accepts = kind.accepts(name);
    if accepts.contains(&artifact) {
        return Ok(());
    }
    Err(format!(
        "input `{name}` of a {} job must be {}, but it is {} {artifact}",
        kind.as_str(),
        accepts
            .iter()
            .map(|a| format!("a {a}"))
            .collect::<Vec<_>>()
            .join(" or "),
        if artifact.as_str().starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        },
    ))
}

/// Merge user hyperparameters over the kind's defaults, refusing unknown names
/// and wrong types by name. Returns the effective set.
pub fn effective_hyperparameters(kind: JobKind, given: &Value) -> Result<Value, String> {
    let given = match given {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        other => {
            return Err(format!(
                "hyperparameters must be a JSON object, got {other}"
            ))
        }
    };
    let defaults = match kind.default_hyperparameters() {
        Value::Object(m) => m,
        _ => unreachable!("params are structs"),
    };
    let mut merged = defaults.clone();
    for (k, v) in &given {
        if !defaults.contains_key(k) {
            let mut known: Vec<&String> = defaults.keys().collect();
            known.sort();
            return Err(format!(
                "unknown hyperparameter `{k}` for job kind {} (known: {})",
                kind.as_str(),
                known
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // Check this one field alone so the error can name it.
        let mut one = defaults.clone();
        one.insert(k.clone(), v.clone());
        if let Err(e) = check(kind, &Value::Object(one)) {
            return Err(format!(
                "hyperparameter `{k}` = {v}: {e} (default: {})",
                defaults[k]
            ));
        }
        merged.insert(k.clone(), v.clone());
    }
    let merged = Value::Object(merged);
    check(kind, &merged)?;
    Ok(merged)
}

fn parse_params<T: DeserializeOwned + Validate>(v: &Value) -> Result<T, String> {
    let p: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(p)
}

fn check(kind: JobKind, v: &Value) -> Result<(), String> {
    match kind {
        JobKind::Rm => parse_params::<rm::Params>(v).map(drop),
        JobKind::Sample => parse_params::<sample::Params>(v).map(drop),
        JobKind::Sft => parse_params::<sft::Params>(v).map(drop),
        JobKind::Dpo => parse_params::<dpo::Params>(v).map(drop),
        JobKind::Average => parse_params::<average::Params>(v).map(drop),
        JobKind::Curate => parse_params::<curate::Params>(v).map(drop),
        JobKind::Eval => parse_params::<eval::Params>(v).map(drop),
        JobKind::Annotate => parse_params::<annotate::Params>(v).map(drop),
        JobKind::External => Err("external runs are recorded, not run by herd".into()),
    }
}

/// The simulated annotators' ranking rule (which of two responses to a
/// checkable prompt is better, and by how much): what `annotate` records.
pub fn annotator_rank(a: &str, b: &str, answer: &str) -> Option<(usize, crate::data::Strength)> {
    annotate::rank(a, b, answer)
}

/// Range checks beyond types.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// Check the input names of a job before it is queued.
pub fn check_inputs(kind: JobKind, inputs: &BTreeMap<String, String>) -> Result<(), String> {
    let (required, optional) = kind.inputs();
    if kind == JobKind::Average {
        if inputs.len() < 2 {
            return Err("average needs at least two checkpoint inputs".into());
        }
        return Ok(());
    }
    for r in required {
        if !inputs.contains_key(*r) {
            return Err(format!(
                "job kind {} needs input `{r}` (required: {}; optional: {})",
                kind.as_str(),
                required.join(", "),
                optional.join(", ")
            ));
        }
    }
    for k in inputs.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(format!(
                "job kind {} takes no input `{k}` (required: {}; optional: {})",
                kind.as_str(),
                required.join(", "),
                optional.join(", ")
            ));
        }
    }
    Ok(())
}

/// Everything a job needs to run.
pub struct JobContext<'a> {
    pub kind: JobKind,
    /// Effective hyperparameters (already validated).
    pub hyperparameters: Value,
    pub seed: u64,
    /// Input name -> local path (checkpoint directory or dataset file).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Scratch space for outputs.
    pub workdir: PathBuf,
    pub device: candle_core::Device,
    pub sink: &'a mut dyn Sink,
}

impl JobContext<'_> {
    pub fn input(&self, name: &str) -> Result<&Path> {
        self.inputs
            .get(name)
            .map(|p| p.as_path())
            .ok_or_else(|| anyhow::anyhow!("missing input `{name}`"))
    }
    pub fn params<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_value(self.hyperparameters.clone())?)
    }
}

/// Run a job to completion; returns its summary (also the outcome record).
pub fn run(ctx: &mut JobContext) -> Result<Value> {
    std::fs::create_dir_all(&ctx.workdir)?;
    match ctx.kind {
        JobKind::Rm => rm::run(ctx),
        JobKind::Sample => sample::run(ctx),
        JobKind::Sft => sft::run(ctx),
        JobKind::Dpo => dpo::run(ctx),
        JobKind::Average => average::run(ctx),
        JobKind::Curate => curate::run(ctx),
        JobKind::Eval => eval::run(ctx),
        JobKind::Annotate => annotate::run(ctx),
        JobKind::External => anyhow::bail!("external runs are recorded, not run by herd"),
    }
}
