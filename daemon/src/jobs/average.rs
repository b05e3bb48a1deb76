//! `average`: a weighted mean of checkpoints of the same shape (Llama 3
//! averages models from runs with different data or hyperparameters), or of
//! LoRA adapters of one base (exactly: the merged result is the mean of the
//! merged models; see `herd_engine::average::adapters`). Inputs are taken
//! in name order; `weights` follow that order.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::recipe::{InputNames, InputSource, JobContext, OutputKind, Recipe, Validate};
use herd_core::{ArtifactKind, JobKind};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// One per input in name order; empty = uniform.
    pub weights: Vec<f64>,
    /// Average only the best `top_k` inputs (0: all). When the job starts,
    /// the jobs whose outputs they are are ranked by their last value of
    /// `by` (`choose_inputs`), and the chosen ones recorded as the job's
    /// resolved inputs
    /// (a sweep's "average the top K"); with no more than `top_k` inputs
    /// all are taken, which is how a reproduction re-runs the choice.
    pub top_k: usize,
    /// `metric.NAME`: what ranks the inputs when `top_k` > 0.
    pub by: String,
    /// `min` (lowest first: losses) or `max` (highest first: rewards).
    pub order: String,
}

impl Params {
    /// The metric name and whether lower is better, when ranking.
    pub fn ranking(&self) -> Option<(&str, bool)> {
        if self.top_k == 0 {
            return None;
        }
        let name = self.by.strip_prefix("metric.")?;
        Some((name, self.order == "min"))
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        if self.weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err("weights must be finite and non-negative".into());
        }
        if !self.by.is_empty() && self.by.strip_prefix("metric.").is_none_or(str::is_empty) {
            return Err("by: `metric.NAME`, the metric that ranks the inputs".into());
        }
        if !matches!(self.order.as_str(), "" | "min" | "max") {
            return Err("order: `min` (lowest first, e.g. a loss) or `max` (highest first)".into());
        }
        Ok(())
    }
}

impl Params {
    /// top_k, by and order go together (checked on the whole set).
    fn check_ranking(&self) -> Result<(), String> {
        if self.top_k > 0 {
            if self.by.is_empty() {
                return Err(
                    "top_k needs by = `metric.NAME`, the metric that ranks the inputs".into(),
                );
            }
            if self.order.is_empty() {
                return Err("top_k needs order = `min` (lowest first, e.g. a loss) or `max` (highest first)".into());
            }
            if !self.weights.is_empty() {
                return Err("weights: not with top_k (which inputs are kept is decided when the job starts)".into());
            }
        } else if !self.by.is_empty() || !self.order.is_empty() {
            return Err("by and order: only with top_k > 0".into());
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
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[
        (
            "checkpoint",
            OutputKind::WhenInputsAre(ArtifactKind::Checkpoint),
        ),
        ("adapter", OutputKind::WhenInputsAre(ArtifactKind::Adapter)),
    ];
    const ACCEPTS_OTHERWISE: &'static [ArtifactKind] =
        &[ArtifactKind::Checkpoint, ArtifactKind::Adapter];
    /// `top_k`: keep the inputs whose jobs rank best by the metric's last
    /// value (ties by input name). With no more inputs than `top_k` all are
    /// kept (a reproduction gives exactly the kept hashes).
    fn choose_inputs(
        params: &Params,
        resolved: &mut BTreeMap<String, String>,
        source: &dyn Fn(&str) -> Option<InputSource>,
    ) -> Result<Option<String>> {
        let Some((metric, lowest_first)) = params.ranking() else {
            return Ok(None);
        };
        if resolved.len() <= params.top_k {
            return Ok(None);
        }
        let mut ranked = vec![];
        for name in resolved.keys() {
            let job = source(name).ok_or_else(|| {
                anyhow!(
                    "input `{name}` is not a job's output, so it has no metric to rank by (top_k {} of {} inputs)",
                    params.top_k,
                    resolved.len()
                )
            })?;
            let (_, value) = job.last_metrics.get(metric).ok_or_else(|| {
                anyhow!(
                    "input `{name}`: job {} ({}) recorded no metric `{metric}` (it has: {})",
                    job.job,
                    job.name,
                    job.last_metrics
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            if !value.is_finite() {
                bail!(
                    "input `{name}`: job {} ended with {metric} = {value}",
                    job.job
                );
            }
            ranked.push((*value, name.clone()));
        }
        ranked.sort_by(|a, b| {
            let by_value = if lowest_first {
                a.0.total_cmp(&b.0)
            } else {
                b.0.total_cmp(&a.0)
            };
            by_value.then_with(|| a.1.cmp(&b.1))
        });
        let kept: Vec<&(f64, String)> = ranked.iter().take(params.top_k).collect();
        resolved.retain(|name, _| kept.iter().any(|(_, k)| k == name));
        let said: Vec<String> = ranked
            .iter()
            .map(|(v, n)| {
                let mark = if resolved.contains_key(n) {
                    "kept"
                } else {
                    "left"
                };
                format!("{n} {v} ({mark})")
            })
            .collect();
        Ok(Some(format!(
            "top {} of {} by metric.{metric} ({}): {}",
            params.top_k,
            ranked.len(),
            if lowest_first {
                "lowest first"
            } else {
                "highest first"
            },
            said.join(", ")
        )))
    }
    fn check_with_inputs(p: &Params, inputs: &[&str]) -> Result<(), String> {
        p.check_ranking()?;
        if p.weights.is_empty() {
            return Ok(());
        }
        if p.weights.len() != inputs.len() {
            return Err(format!(
                "weights: {} weight(s) for {} inputs ({}; in that order)",
                p.weights.len(),
                inputs.len(),
                inputs.join(", ")
            ));
        }
        let total: f64 = p.weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return Err(format!(
                "weights: they sum to {total}; the sum must be finite and positive (each is divided by it)"
            ));
        }
        Ok(())
    }
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
    let is_adapter = |dir: &std::path::Path| dir.join(herd_engine::lora::ADAPTER_CONFIG).exists();
    let first_is_adapter = is_adapter(&inputs[0].1);
    if let Some((name, _)) = inputs
        .iter()
        .find(|(_, d)| is_adapter(d) != first_is_adapter)
    {
        let kind = |adapter: bool| {
            if adapter {
                "an adapter"
            } else {
                "a checkpoint"
            }
        };
        anyhow::bail!(
            "input `{name}` is {} but `{}` is {}: average takes inputs of one kind",
            kind(!first_is_adapter),
            inputs[0].0,
            kind(first_is_adapter)
        );
    }
    if first_is_adapter {
        return average_adapters(ctx, &inputs, &p);
    }
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
    ctx.finish_with(
        "checkpoint",
        herd_core::ArtifactKind::Checkpoint,
        &out,
        summary,
    )
}

fn average_adapters(
    ctx: &mut JobContext,
    inputs: &[(String, std::path::PathBuf)],
    p: &Params,
) -> Result<Value> {
    let mut adapters = vec![];
    for (name, dir) in inputs {
        let read = || -> Result<_> {
            let config = herd_engine::lora::LoraConfig::from_file(
                &dir.join(herd_engine::lora::ADAPTER_CONFIG),
            )?;
            Ok((config, herd_engine::lora::load_tensors(dir)?))
        };
        adapters.push(read().with_context(|| format!("input `{name}`"))?);
    }
    let (config, tensors) = herd_engine::average::adapters(&adapters, &p.weights)?;
    // The base the adapters share (the daemon checked they share one).
    let base: Value = serde_json::from_str::<Value>(&std::fs::read_to_string(
        inputs[0].1.join(herd_engine::lora::ADAPTER_CONFIG),
    )?)?["base_model_name_or_path"]
        .clone();
    let out = ctx.workdir.join("adapter");
    herd_engine::checkpoint::write_adapter(&config, &tensors, &out, base.as_str().unwrap_or(""))?;
    let summary = json!({"adapters": inputs.iter().map(|x| x.0.clone()).collect::<Vec<_>>(), "weights": p.weights, "rank": config.rank});
    ctx.finish_with("adapter", ArtifactKind::Adapter, &out, summary)
}

fn kind(c: &herd_engine::LlamaConfig) -> &'static str {
    if c.num_labels == 1 {
        "reward model"
    } else {
        "causal LM"
    }
}
