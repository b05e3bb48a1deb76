//! `average`: a weighted mean of checkpoints of the same shape (Llama 3
//! averages models from runs with different data or hyperparameters).
//! Inputs are taken in name order; `weights` follow that order.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::recipe::{InputNames, OutputKind, Recipe};
use super::{ArtifactKind, JobContext, JobKind, Validate};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// One per input in name order; empty = uniform.
    pub weights: Vec<f64>,
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        if self.weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err("weights must be finite and non-negative".into());
        }
        Ok(())
    }
}

/// The `average` recipe.
pub struct Average;

impl Recipe for Average {
    type Params = Params;
    const KIND: JobKind = JobKind::Average;
    const INPUTS: InputNames = InputNames::AtLeast(2);
    const OUTPUTS: &'static [(&'static str, OutputKind)] =
        &[("checkpoint", OutputKind::Is(ArtifactKind::Checkpoint))];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let inputs: Vec<(String, std::path::PathBuf)> = ctx
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut models = vec![];
    for (name, dir) in &inputs {
        models.push(
            herd_engine::checkpoint::load_tensors(dir)
                .with_context(|| format!("input `{name}`"))?,
        );
    }
    let first = &inputs[0].1;
    let config = herd_engine::LlamaConfig::from_file(&first.join(herd_engine::checkpoint::CONFIG))?;
    for (name, dir) in &inputs[1..] {
        let c = herd_engine::LlamaConfig::from_file(&dir.join(herd_engine::checkpoint::CONFIG))?;
        if c.num_labels != config.num_labels {
            anyhow::bail!(
                "input `{name}` is a {} but `{}` is a {}",
                kind(&c),
                inputs[0].0,
                kind(&config)
            );
        }
    }
    let avg: BTreeMap<_, _> = herd_engine::average::average(&models, &p.weights)?;
    let model = herd_engine::Llama::from_tensors(config, avg, &ctx.device)?;
    let out = ctx.workdir.join("checkpoint");
    herd_engine::checkpoint::save_model(&model, &out, Some(first))?;
    let summary = json!({"models": inputs.iter().map(|x| x.0.clone()).collect::<Vec<_>>(), "weights": p.weights});
    ctx.sink.output(
        "checkpoint",
        herd_core::ArtifactKind::Checkpoint,
        &out,
        summary.clone(),
    )?;
    Ok(summary)
}

fn kind(c: &herd_engine::LlamaConfig) -> &'static str {
    if c.num_labels == 1 {
        "reward model"
    } else {
        "causal LM"
    }
}
