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
    let weights: Vec<f64> = if weights.is_empty() {
        vec![1.0 / models.len() as f64; models.len()]
    } else {
        if weights.len() != models.len() {
            return Err(EngineError::Input(format!(
                "{} weights for {} models",
                weights.len(),
                models.len()
            )));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(EngineError::Input(format!(
                "weights must be finite and non-negative, got {weights:?}"
            )));
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return Err(EngineError::Input("weights sum to zero".into()));
        }
        weights.iter().map(|w| w / total).collect()
    };
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
