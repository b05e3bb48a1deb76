//! `mix`: datasets of one kind in, one dataset out.
//!
//! Llama 3 trains each round's reward model on all the preference data
//! collected so far, and its SFT on a mix of rejection-sampled and other
//! data. Mixing inside herd keeps the lineage to every input (concatenating
//! outside and re-importing would cut it).
//!
//! 1. Exact duplicates go first: a row already seen (in an input earlier by
//!    name, or earlier in the same input) is dropped, so data collected twice
//!    is not counted twice.
//! 2. Each input then contributes `counts[name]` rows, or `weights[name]` ×
//!    its unique rows (default 1: each once): whole copies of the input, plus
//!    a seeded sample without replacement for the remainder. Up-sampling
//!    repeats rows on purpose; down-sampling keeps a seeded subset.
//! 3. Inputs in name order, each input's rows in their own order.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};
use herd_engine::rng::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::inputs::save_dataset;
use super::recipe::{InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{self, Dataset, DatasetKind};
use herd_core::{ArtifactKind, JobKind};

/// Largest multiplier and count one input may be given.
const MAX_WEIGHT: f64 = 1000.0;
const MAX_ROWS: usize = 10_000_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// Input name -> multiplier of its unique rows (default 1).
    pub weights: BTreeMap<String, f64>,
    /// Input name -> exact number of rows to take (instead of a weight).
    pub counts: BTreeMap<String, usize>,
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        for (name, w) in &self.weights {
            if !(w.is_finite() && (0.0..=MAX_WEIGHT).contains(w)) {
                return Err(format!("weights.{name} must be in [0, {MAX_WEIGHT}]"));
            }
            if self.counts.contains_key(name) {
                return Err(format!(
                    "input `{name}` has both a weight and a count; give one"
                ));
            }
        }
        for (name, n) in &self.counts {
            if *n > MAX_ROWS {
                return Err(format!("counts.{name} must be at most {MAX_ROWS}"));
            }
        }
        Ok(())
    }
}

/// The `mix` recipe.
pub struct Mix;

impl Recipe for Mix {
    type Params = Params;
    const KIND: JobKind = JobKind::Mix;
    const INPUTS: InputNames = InputNames::AtLeast(1);
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[("data", OutputKind::SameAsInputs)];
    const ACCEPTS_OTHERWISE: &'static [ArtifactKind] = &[
        ArtifactKind::Sft,
        ArtifactKind::Preference,
        ArtifactKind::Prompts,
    ];
    fn check_with_inputs(p: &Params, inputs: &[&str]) -> Result<(), String> {
        for name in p.weights.keys().chain(p.counts.keys()) {
            if !inputs.contains(&name.as_str()) {
                return Err(format!(
                    "weights and counts name inputs, but this job has no input `{name}` (inputs: {})",
                    inputs.join(", ")
                ));
            }
        }
        Ok(())
    }
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

/// A dataset file as whichever kind it parses as (the daemon checked at
/// submit that every input is a dataset of one kind).
fn read(path: &std::path::Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let kinds = [
        DatasetKind::Preference,
        DatasetKind::Sft,
        DatasetKind::Prompts,
    ];
    Ok(data::parse_any(
        &kinds,
        &bytes,
        &path.display().to_string(),
    )?)
}

/// How many rows of each input, and which: whole copies, then a seeded
/// sample of the remainder (kept in input order).
fn take<T: Clone>(rows: &[T], want: usize, rng: &mut Rng) -> Vec<T> {
    if rows.is_empty() {
        return vec![];
    }
    let (copies, rest) = (want / rows.len(), want % rows.len());
    let mut order: Vec<usize> = (0..rows.len()).collect();
    rng.shuffle(&mut order);
    let mut extra = vec![false; rows.len()];
    for i in &order[..rest] {
        extra[*i] = true;
    }
    let mut out = Vec::with_capacity(want);
    for (i, row) in rows.iter().enumerate() {
        for _ in 0..copies + usize::from(extra[i]) {
            out.push(row.clone());
        }
    }
    out
}

/// Mix rows of one type: dedup across inputs, then take each input's share.
fn mix<T: Clone + Serialize>(
    inputs: Vec<(String, Vec<T>)>,
    p: &Params,
    seed: u64,
) -> Result<(Vec<T>, Value)> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut rng = Rng::new(seed ^ 0x6d69_78);
    let (mut out, mut per_input) = (vec![], serde_json::Map::new());
    for (name, rows) in inputs {
        let n = rows.len();
        let unique: Vec<T> = rows
            .into_iter()
            .filter(|r| seen.insert(serde_json::to_string(r).expect("rows serialize")))
            .collect();
        let want = match (p.counts.get(&name), p.weights.get(&name)) {
            (Some(c), _) => *c,
            (None, Some(w)) => (w * unique.len() as f64).round() as usize,
            (None, None) => unique.len(),
        };
        if want > 0 && unique.is_empty() {
            bail!("input `{name}`: {want} rows asked for, but it has no rows left after dropping duplicates ({n} in)");
        }
        let taken = take(&unique, want, &mut rng);
        per_input.insert(
            name,
            json!({"rows": n, "duplicates": n - unique.len(), "taken": taken.len()}),
        );
        out.extend(taken);
    }
    Ok((out, Value::Object(per_input)))
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let names: Vec<String> = ctx.inputs.keys().cloned().collect();
    let mut sets = vec![];
    for name in &names {
        let ds = read(ctx.input(name)?).with_context(|| format!("input `{name}`"))?;
        sets.push((name.clone(), ds));
    }
    let kind = sets[0].1.kind();
    if let Some((name, d)) = sets.iter().find(|(_, d)| d.kind() != kind) {
        bail!(
            "mix takes datasets of one kind: `{}` is {} data, `{name}` is {} data",
            sets[0].0,
            kind.as_str(),
            d.kind().as_str()
        );
    }
    macro_rules! mixed {
        ($variant:ident) => {{
            let rows = sets
                .into_iter()
                .map(|(n, d)| match d {
                    Dataset::$variant(r) => (n, r),
                    _ => unreachable!("kinds checked above"),
                })
                .collect();
            let (rows, per_input) = mix(rows, &p, ctx.seed)?;
            (Dataset::$variant(rows), per_input)
        }};
    }
    let (out, per_input) = match kind {
        DatasetKind::Preference => mixed!(Preference),
        DatasetKind::Sft => mixed!(Sft),
        DatasetKind::Prompts => mixed!(Prompts),
    };
    if out.is_empty() {
        bail!("the mix is empty: {per_input}");
    }
    let duplicates: u64 = per_input
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .map(|v| v["duplicates"].as_u64().unwrap_or(0))
        .sum();
    ctx.sink.metrics(
        0,
        &[
            ("rows".to_string(), out.len() as f64),
            ("duplicates_dropped".to_string(), duplicates as f64),
        ],
    )?;
    save_dataset(ctx, "data", &out)?;
    Ok(
        json!({"kind": kind.as_str(), "rows": out.len(), "duplicates_dropped": duplicates, "inputs": per_input}),
    )
}
