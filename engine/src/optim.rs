//! AdamW with PyTorch semantics, learning-rate schedules, gradient clipping.
//!
//! Moments and master weights are f32 whatever the checkpoint dtype: in bf16,
//! lr 1e-5 updates round to nothing. Weight decay is decoupled (applied to
//! the weights, not the gradient) and only to matrices (rank >= 2); norm
//! gains are not decayed, as is usual for transformers.

use candle_core::{Tensor, Var};

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with `grads` (aligned with the params) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(EngineError::Input(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (i, ((_, p), g)) in self.params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut w = p.as_tensor().clone();
            if c.weight_decay != 0.0 && p.rank() >= 2 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let w = (w - ((&m / denom)? * step_size)?)?;
            p.set(&w)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// Linear warmup to the base rate, then decay to `min_ratio` * base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// Rate for update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.base * self.min_ratio;
        match self.decay {
            Decay::Constant => self.base,
            Decay::Linear => self.base - (self.base - min) * progress,
            Decay::Cosine => {
                min + (self.base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Global L2 norm of all gradients (accumulated in f64).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (as torch's
/// clip_grad_norm_). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Backward pass: gradients of `loss` for each parameter, in order. A
/// parameter that gets none means the graph is cut (a fused op without
/// backward, a detach too many): that is an error, never silently zero.
pub fn gradients(loss: &Tensor, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let store = loss.backward()?;
    params
        .iter()
        .map(|(name, p)| {
            store
                .get(p.as_tensor())
                .cloned()
                .ok_or_else(|| EngineError::NoGradient(name.clone()))
        })
        .collect()
}
