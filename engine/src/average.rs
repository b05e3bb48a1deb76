//! Model averaging (Llama 3 averages models from runs with different data or
//! hyperparameters at each stage): a weighted mean of same-shaped checkpoints.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

/// Weighted average of tensor maps. `weights` empty means uniform; otherwise
/// non-negative, one per model, normalized to sum to 1.
pub fn average(
    models: &[BTreeMap<String, Tensor>],
    weights: &[f64],
) -> Result<BTreeMap<String, Tensor>> {
    if models.is_empty() {
        return Err(EngineError::Input("nothing to average".into()));
    }
    let weights = normalized(weights, models.len())?;
    let first = &models[0];
    for (i, m) in models.iter().enumerate().skip(1) {
        for (name, t) in first {
            let other = m
                .get(name)
                .ok_or_else(|| EngineError::Input(format!("model {i} has no tensor `{name}`")))?;
            if other.dims() != t.dims() {
                return Err(EngineError::Input(format!(
                    "tensor `{name}`: model 0 has shape {:?}, model {i} has {:?}",
                    t.dims(),
                    other.dims()
                )));
            }
        }
        if let Some(extra) = m.keys().find(|k| !first.contains_key(*k)) {
            return Err(EngineError::Input(format!(
                "model {i} has a tensor `{extra}` that model 0 lacks"
            )));
        }
    }
    let mut out = BTreeMap::new();
    for name in first.keys() {
        let mut acc = (models[0][name].to_dtype(DType::F32)? * weights[0])?;
        for (m, w) in models.iter().zip(&weights).skip(1) {
            acc = (acc + (m[name].to_dtype(DType::F32)? * *w)?)?;
        }
        out.insert(name.clone(), acc);
    }
    Ok(out)
}

/// `weights` made to sum to 1 (empty: uniform over `n`), after checking
/// there is one per model and each is finite and non-negative.
fn normalized(weights: &[f64], n: usize) -> Result<Vec<f64>> {
    if weights.is_empty() {
        return Ok(vec![1.0 / n as f64; n]);
    }
    if weights.len() != n {
        return Err(EngineError::Input(format!(
            "{} weights for {n} models",
            weights.len()
        )));
    }
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(EngineError::Input(format!(
            "weights must be finite and non-negative, got {weights:?}"
        )));
    }
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(EngineError::Input(format!(
            "weights must sum to a finite positive number, got {total}"
        )));
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

/// The weighted average of LoRA adapters of one base, exactly: an adapter
/// whose merged model is the weighted average of the adapters' merged
/// models. Its rank is the sum of theirs: A stacks the A's, B puts the
/// B's side by side, each scaled by its weight and its adapter's scale, and
/// the result has scale 1 (PEFT's "cat"). Averaging A and B separately
/// (PEFT's "linear") would not average the models: mean(B)·mean(A) is not
/// mean(B·A). A reward model's score head is averaged as a weight.
pub fn adapters(
    adapters: &[(crate::lora::LoraConfig, BTreeMap<String, Tensor>)],
    weights: &[f64],
) -> Result<(crate::lora::LoraConfig, BTreeMap<String, Tensor>)> {
    use crate::lora::{tensor_name, SCORE_TENSOR};
    if adapters.is_empty() {
        return Err(EngineError::Input("nothing to average".into()));
    }
    let weights = normalized(weights, adapters.len())?;
    let first = &adapters[0].0;
    for (i, (c, _)) in adapters.iter().enumerate().skip(1) {
        if c.targets != first.targets || c.score != first.score {
            return Err(EngineError::Input(format!(
                "adapter {i} adapts {:?}{} but adapter 0 adapts {:?}{}: only adapters of the same projections average",
                c.targets,
                if c.score { " and a score head" } else { "" },
                first.targets,
                if first.score { " and a score head" } else { "" },
            )));
        }
    }
    let mut out = BTreeMap::new();
    let layers: std::collections::BTreeSet<usize> = adapters[0]
        .1
        .keys()
        .filter_map(|k| {
            k.strip_prefix("base_model.model.model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    for l in layers {
        for proj in &first.targets {
            let (an, bn) = (tensor_name(l, proj, "A"), tensor_name(l, proj, "B"));
            let mut a_parts = vec![];
            let mut b_parts = vec![];
            for (i, ((c, t), w)) in adapters.iter().zip(&weights).enumerate() {
                let get = |n: &str| {
                    t.get(n)
                        .map(|x| x.to_dtype(DType::F32))
                        .transpose()?
                        .ok_or_else(|| {
                            EngineError::Input(format!("adapter {i} has no tensor `{n}`"))
                        })
                };
                a_parts.push(get(&an)?);
                b_parts.push((get(&bn)? * (w * c.scale()))?);
            }
            out.insert(an, Tensor::cat(&a_parts, 0)?);
            out.insert(bn, Tensor::cat(&b_parts, 1)?);
        }
    }
    if first.score {
        let heads: Vec<BTreeMap<String, Tensor>> = adapters
            .iter()
            .map(|(_, t)| {
                t.get(SCORE_TENSOR)
                    .map(|h| BTreeMap::from([(SCORE_TENSOR.to_string(), h.clone())]))
                    .ok_or_else(|| {
                        EngineError::Input(format!("an adapter has no `{SCORE_TENSOR}`"))
                    })
            })
            .collect::<Result<_>>()?;
        out.extend(average(&heads, &weights)?);
    }
    let rank: usize = adapters.iter().map(|(c, _)| c.rank).sum();
    let config = crate::lora::LoraConfig {
        rank,
        alpha: rank as f64,
        targets: first.targets.clone(),
        rslora: false,
        dropout: first.dropout,
        score: first.score,
    };
    Ok((config, out))
}
