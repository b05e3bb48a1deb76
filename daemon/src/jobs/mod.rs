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
mod grpo;
mod inputs;
mod merge;
mod mix;
pub mod recipe;
mod registry;
mod rm;
mod sample;
mod sft;
mod sink;
mod training;

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{Map, Value};

pub use curate::{minhash, near_duplicates, near_duplicates_exhaustive};
pub use generation::{complete, complete_counts, score, GenParams};
pub use inputs::{chat_of, load_dataset, prompt_completions, save_dataset, similarity, truncate};
pub use sink::{store_output, MemorySink, Sink};
pub use training::{in_range, limits, save_trained, train_loop, LoraParams, TrainParams};

pub use herd_core::{ArtifactKind, JobKind};
pub use recipe::{
    Accepts, Bound, InputNames, InputSource, JobContext, OutputKind, Recipe, Validate,
};
pub use registry::{
    describe, kinds_markdown, output_kind, output_names, outputs_made, recipe, AnyRecipe, RECIPES,
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

/// What other tools (transformers' TrainingArguments, TRL, PEFT) call
/// herd's hyperparameters, for did-you-mean.
const ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("num_train_epochs", "epochs"),
    ("max_steps", "steps"),
    ("per_device_train_batch_size", "batch_size"),
    ("train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("max_length", "max_seq_len"),
    ("max_seq_length", "max_seq_len"),
    ("max_grad_norm", "grad_clip"),
    ("lora_r", "lora_rank"),
    ("r", "lora_rank"),
    ("rpo_alpha", "nll_weight"),
    ("num_generations", "k"),
    ("max_completion_length", "max_new_tokens"),
];

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
    // Every problem at once: a user fixing one `--set` should not meet
    // the next only on the next try.
    let mut problems = vec![];
    let mut known: Vec<&String> = defaults.keys().collect();
    known.sort();
    for (k, v) in &given {
        if !defaults.contains_key(k) {
            let alias = ALIASES
                .iter()
                .find(|(other, _)| other == k)
                .map(|(_, ours)| *ours)
                .filter(|ours| defaults.contains_key(*ours));
            let guess =
                alias.or_else(|| herd_core::vocab::nearest(k, known.iter().map(|n| n.as_str())));
            problems.push(match guess {
                Some(n) => format!("unknown hyperparameter `{k}`: did you mean `{n}`?"),
                None => format!("unknown hyperparameter `{k}`"),
            });
            continue;
        }
        merged.insert(k.clone(), v.clone());
    }
    // A set that checks whole is accepted whole: some fields only make
    // sense together (a verifier rule and its pattern). When it fails,
    // each given field is checked alone over the defaults so the error
    // names every field wrong on its own; when no single field explains
    // the failure, the failure of the whole is the error.
    if let Err(whole) = recipe.check(&Value::Object(merged.clone())) {
        let mut alone = vec![];
        for (k, v) in given.iter().filter(|(k, _)| defaults.contains_key(*k)) {
            let mut one = defaults.clone();
            one.insert(k.clone(), v.clone());
            if let Err(e) = recipe.check(&Value::Object(one)) {
                alone.push((
                    e.clone(),
                    format!("hyperparameter `{k}` = {v}: {e} (default: {})", defaults[k]),
                ));
            }
        }
        if alone.iter().any(|(e, _)| *e == whole) {
            problems.extend(alone.into_iter().map(|(_, text)| text));
        } else {
            problems.push(whole);
        }
    }
    if !problems.is_empty() {
        let unknown = problems.iter().any(|p| p.starts_with("unknown"));
        return Err(format!(
            "{}{}",
            problems.join("; "),
            if unknown {
                format!(
                    " ({} takes: {})",
                    kind.as_str(),
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            }
        ));
    }
    Ok(Value::Object(merged))
}

/// The simulated annotators' ranking rule (which of two responses to a
/// checkable prompt is better, and by how much): what `annotate` records.
pub fn annotator_rank(a: &str, b: &str, answer: &str) -> Option<(usize, crate::data::Strength)> {
    annotate::rank(a, b, answer)
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

/// Run a job to completion; returns its summary (also the outcome record).
pub fn run(ctx: &mut JobContext) -> Result<Value> {
    std::fs::create_dir_all(&ctx.workdir)?;
    recipe(ctx.kind).map_err(anyhow::Error::msg)?.run(ctx)
}
