//! What a recipe is: the trait each recipe file implements, and what a
//! recipe is handed (`JobContext`) and declares (`Validate`, `Bound`,
//! `InputNames`, `OutputKind`). The list of recipes is `registry.rs`; a
//! recipe imports this file, never the registry.
//!
//! Each recipe file implements [`Recipe`]: its kind, the inputs it takes and
//! the artifact kind each needs, what it makes, its typed hyperparameters
//! (defaults, validation) and how it runs.
//!
//! Hyperparameters are checked once, at submit, into the recipe's typed
//! `Params`; the worker parses the recorded effective set into the same
//! type and hands it to `run`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use herd_core::{ArtifactKind, JobKind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::sink::Sink;

/// The input names a recipe takes.
#[derive(Debug, Clone, Copy)]
pub enum InputNames {
    Named {
        required: &'static [&'static str],
        optional: &'static [&'static str],
    },
    /// Any names, at least this many (average: the checkpoints to average;
    /// mix: the datasets to mix).
    AtLeast(usize),
}

impl InputNames {
    /// Exactly these inputs, none optional.
    pub const fn only(required: &'static [&'static str]) -> Self {
        InputNames::Named {
            required,
            optional: &[],
        }
    }
}

/// The outputs of a recipe that makes one plain checkpoint (merge,
/// chat_format).
pub const A_CHECKPOINT: &[(&str, OutputKind)] =
    &[("checkpoint", OutputKind::Is(ArtifactKind::Checkpoint))];

/// The artifact kind of an output.
#[derive(Debug, Clone, Copy)]
pub enum OutputKind {
    Is(ArtifactKind),
    /// The kind of the named input (curate keeps its data's kind).
    SameAs(&'static str),
    /// The kind every input has (mix: checked at submit to be one kind).
    SameAsInputs,
    /// Made, with this kind, only when the inputs are of this kind (average:
    /// `checkpoint` from checkpoints, `adapter` from adapters).
    WhenInputsAre(ArtifactKind),
}

/// (input name, the artifact kinds it accepts).
pub type Accepts = &'static [(&'static str, &'static [ArtifactKind])];

/// One recipe of the Llama 3 loop.
pub trait Recipe: Sync + 'static {
    /// Typed hyperparameters: `Default` gives the defaults, `Validate` the
    /// ranges beyond types.
    type Params: Default + Serialize + DeserializeOwned + Validate;
    const KIND: JobKind;
    const INPUTS: InputNames;
    /// (output name, its kind).
    const OUTPUTS: &'static [(&'static str, OutputKind)];
    /// The output holding the human (or simulated human) preferences the
    /// job collects, if it collects any: what a round's
    /// `$all_preferences` gathers from every earlier round (annotate's
    /// `data`).
    const COLLECTS_PREFERENCES: Option<&'static str> = None;
    /// The artifact kinds inputs accept, by input name; any other input
    /// accepts [`Recipe::ACCEPTS_OTHERWISE`].
    const ACCEPTS: Accepts = &[];
    const ACCEPTS_OTHERWISE: &'static [ArtifactKind] = &[ArtifactKind::Checkpoint];
    /// The artifact kinds input `name` accepts.
    fn accepts(input: &str) -> &'static [ArtifactKind] {
        Self::ACCEPTS
            .iter()
            .find(|(name, _)| *name == input)
            .map_or(Self::ACCEPTS_OTHERWISE, |(_, kinds)| kinds)
    }
    /// Checks of the hyperparameters against the job's input names (mix:
    /// its weights name inputs), at submit.
    fn check_with_inputs(_params: &Self::Params, _inputs: &[&str]) -> Result<(), String> {
        Ok(())
    }
    /// At start, before inputs are materialized: keep only some of the
    /// resolved inputs (name -> hash), saying which and why (average's
    /// `top_k` by a metric of the jobs that made them). `source` tells the
    /// job an input came from, when it is a job's output.
    fn choose_inputs(
        _params: &Self::Params,
        _resolved: &mut BTreeMap<String, String>,
        _source: &dyn Fn(&str) -> Option<InputSource>,
    ) -> Result<Option<String>> {
        Ok(None)
    }
    fn run(ctx: &mut JobContext, params: Self::Params) -> Result<Value>;
}

/// The job an input came from, as `choose_inputs` sees it.
#[derive(Debug, Clone)]
pub struct InputSource {
    pub job: Uuid,
    pub name: String,
    /// Last step and value of each metric it recorded.
    pub last_metrics: BTreeMap<String, (u64, f64)>,
}

/// What typed hyperparameters answer beyond their types: range checks,
/// and which outputs they make.
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
    /// Whether a job with these settings and input names makes output
    /// `output`: every declared one, unless the settings choose (training:
    /// an `adapter` with LoRA, else a `checkpoint`).
    fn makes(&self, _inputs: &[&str], _output: &str) -> bool {
        true
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
    /// `(min, max]`: above `min`, at most `max`.
    pub const fn above(name: &'static str, min: f64, max: f64) -> Self {
        Bound {
            name,
            min,
            min_inclusive: false,
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

    /// Record `path` as output `name` and end the job with `summary`, its
    /// result: how a recipe that makes one artifact finishes.
    pub fn finish_with(
        &mut self,
        name: &str,
        kind: ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<Value> {
        self.sink.output(name, kind, path, summary.clone())?;
        Ok(summary)
    }
}
