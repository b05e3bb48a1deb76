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
pub mod average;
mod chat_format;
mod curate;
mod dpo;
mod eval;
mod generate;
mod generation;
mod inputs;
mod merge;
mod mix;
pub mod recipe;
mod rm;
mod sample;
mod sft;
mod sink;
mod training;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{Map, Value};

pub use curate::{minhash, near_duplicates, near_duplicates_exhaustive};
pub use generation::{complete, complete_counts, score, GenParams};
pub use inputs::{chat_of, load_dataset, prompt_completions, save_dataset, similarity, truncate};
pub use sink::{store_output, MemorySink, Sink};
pub use training::{in_range, limits, save_trained, train_loop, LoraParams, TrainParams};

pub use herd_core::{ArtifactKind, JobKind};
pub use recipe::{
    output_kind, output_names, outputs_made, recipe, AnyRecipe, InputNames, OutputKind, Recipe,
    RECIPES,
};

/// Input `name` of a `kind` job may be an artifact of kind `artifact`.
pub fn check_input_kind(kind: JobKind, name: &str, artifact: ArtifactKind) -> Result<(), String> {
    let accepts = recipe(kind)?.accepts(name);
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
    let recipe = recipe(kind)?;
    let defaults = match recipe.default_hyperparameters() {
        Value::Object(m) => m,
        _ => unreachable!("params are structs"),
    };
    let mut merged = defaults.clone();
    for (k, v) in &given {
        if !defaults.contains_key(k) {
            let mut known: Vec<&String> = defaults.keys().collect();
            known.sort();
            let guess = known
                .iter()
                .map(|n| (strsim::damerau_levenshtein(k, n), *n))
                .filter(|(d, n)| *d <= 2.max(n.len() / 3))
                .min()
                .map(|(_, n)| format!("did you mean `{n}`? "))
                .unwrap_or_default();
            return Err(format!(
                "unknown hyperparameter `{k}` for job kind {}; {guess}(known: {})",
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
        if let Err(e) = recipe.check(&Value::Object(one)) {
            return Err(format!(
                "hyperparameter `{k}` = {v}: {e} (default: {})",
                defaults[k]
            ));
        }
        merged.insert(k.clone(), v.clone());
    }
    let merged = Value::Object(merged);
    recipe.check(&merged)?;
    Ok(merged)
}

/// The simulated annotators' ranking rule (which of two responses to a
/// checkable prompt is better, and by how much): what `annotate` records.
pub fn annotator_rank(a: &str, b: &str, answer: &str) -> Option<(usize, crate::data::Strength)> {
    annotate::rank(a, b, answer)
}

/// Range checks beyond types.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
    /// The numeric ranges `validate` enforces, for `herd kinds` (a test
    /// holds each against `validate` at both ends).
    fn bounds() -> Vec<Bound>
    where
        Self: Sized,
    {
        vec![]
    }
}

/// A hyperparameter's accepted interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    pub name: &'static str,
    pub min: f64,
    /// Whether `min` itself is accepted.
    pub min_inclusive: bool,
    /// None: no upper bound.
    pub max: Option<f64>,
    pub max_inclusive: bool,
}

impl Bound {
    /// `[min, max]`.
    pub const fn closed(name: &'static str, min: f64, max: f64) -> Self {
        Bound {
            name,
            min,
            min_inclusive: true,
            max: Some(max),
            max_inclusive: true,
        }
    }
    /// `[min, ∞)`, or `(min, ∞)` when not `inclusive`.
    pub const fn at_least(name: &'static str, min: f64, inclusive: bool) -> Self {
        Bound {
            name,
            min,
            min_inclusive: inclusive,
            max: None,
            max_inclusive: false,
        }
    }
    /// As people read intervals: `[1, 4096]`, `(0, ∞)`, `[0, 0.9)`.
    pub fn text(&self) -> String {
        let n = |x: f64| {
            if x == x.trunc() && x.abs() < 1e15 {
                format!("{}", x as i64)
            } else {
                format!("{x}")
            }
        };
        format!(
            "{}{}, {}{}",
            if self.min_inclusive { "[" } else { "(" },
            n(self.min),
            self.max.map_or("∞".to_string(), n),
            if self.max.is_some() && self.max_inclusive {
                "]"
            } else {
                ")"
            }
        )
    }
}

/// Check the input names of a job before it is queued.
pub fn check_inputs(kind: JobKind, inputs: &BTreeMap<String, String>) -> Result<(), String> {
    let (required, optional) = match recipe(kind)?.inputs() {
        InputNames::AtLeast(n) if inputs.len() < n => {
            return Err(format!(
                "{kind} needs at least {n} input{}",
                if n == 1 { "" } else { "s" }
            ));
        }
        InputNames::AtLeast(_) => return Ok(()),
        InputNames::Named { required, optional } => (required, optional),
    };
    for r in required {
        if !inputs.contains_key(*r) {
            return Err(format!(
                "job kind {kind} needs input `{r}` (required: {}; optional: {})",
                required.join(", "),
                optional.join(", ")
            ));
        }
    }
    for k in inputs.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(format!(
                "job kind {kind} takes no input `{k}` (required: {}; optional: {})",
                required.join(", "),
                optional.join(", ")
            ));
        }
    }
    Ok(())
}

/// Check hyperparameters that name inputs (mix's weights) against the
/// job's inputs.
pub fn check_with_inputs(
    kind: JobKind,
    hyperparameters: &Value,
    inputs: &BTreeMap<String, String>,
) -> Result<(), String> {
    let names: Vec<&str> = inputs.keys().map(|k| k.as_str()).collect();
    recipe(kind)?.check_with_inputs(hyperparameters, &names)
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
}

/// Run a job to completion; returns its summary (also the outcome record).
pub fn run(ctx: &mut JobContext) -> Result<Value> {
    std::fs::create_dir_all(&ctx.workdir)?;
    recipe(ctx.kind).map_err(anyhow::Error::msg)?.run(ctx)
}
