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
            let decay = if c.weight_decay != 0.0 && p.rank() >= 2 {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let k = StepConsts {
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                decay: decay as f32,
                inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
                eps: c.eps as f32,
                step_size: step_size as f32,
            };
            if let Some((w, m, v)) = step_f32_cpu(p.as_tensor(), &self.m[i], &self.v[i], g, &k)? {
                p.set(&w)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
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

/// The scalars of one AdamW update, in f32 as the tensor path applies them.
struct StepConsts {
    beta1: f32,
    beta2: f32,
    /// 1 - lr * weight_decay for decayed parameters, else 1.
    decay: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

/// The whole AdamW update of one f32 CPU parameter in one pass over its
/// elements (the tensor path makes a dozen passes, each allocating). Same
/// arithmetic, in the same order, as the tensor path below it. `None` when
/// a tensor is not contiguous f32 on the CPU.
fn step_f32_cpu(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    k: &StepConsts,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    let n = p.elem_count();
    let (new_w, new_m, new_v) = {
        let guards = [p, m, v, g].map(|t| t.storage_and_layout());
        let mut slices: Vec<&[f32]> = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            match &**storage {
                Storage::Cpu(CpuStorage::F32(data))
                    if layout.is_contiguous() && layout.shape().elem_count() == n =>
                {
                    slices.push(&data[layout.start_offset()..layout.start_offset() + n])
                }
                _ => return Ok(None),
            }
        }
        let (ws, ms, vs, gs) = (slices[0], slices[1], slices[2], slices[3]);
        let mut new_w = crate::fused::output_buffer(n);
        let mut new_m = crate::fused::output_buffer(n);
        let mut new_v = crate::fused::output_buffer(n);
        const CHUNK: usize = 1 << 14;
        new_w
            .par_chunks_mut(CHUNK)
            .zip(new_m.par_chunks_mut(CHUNK))
            .zip(new_v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, ((wo, mo), vo))| {
                for j in 0..wo.len() {
                    let i = c * CHUNK + j;
                    let gi = gs[i];
                    let mi = ms[i] * k.beta1 + gi * (1.0 - k.beta1);
                    let vi = vs[i] * k.beta2 + (gi * gi) * (1.0 - k.beta2);
                    let denom = vi.sqrt() * k.inv_bc2_sqrt + k.eps;
                    wo[j] = ws[i] * k.decay - (mi / denom) * k.step_size;
                    mo[j] = mi;
                    vo[j] = vi;
                }
            });
        (new_w, new_m, new_v)
    };
    let shape = p.shape().clone();
    let dev = p.device();
    Ok(Some((
        Tensor::from_vec(new_w, shape.clone(), dev)?,
        Tensor::from_vec(new_m, shape.clone(), dev)?,
        Tensor::from_vec(new_v, shape, dev)?,
    )))
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

/// The name of the first parameter holding a NaN or an infinity, if any
/// (one pass over the weights; what a job checks before saving them).
pub fn first_non_finite(params: &[(String, candle_core::Var)]) -> Result<Option<String>> {
    for (name, v) in params {
        let t = v.as_tensor();
        let t = if t.dtype() == candle_core::DType::F32 {
            t.clone()
        } else {
            t.to_dtype(candle_core::DType::F32)?
        };
        // NaN and ±inf turn the sum of |x| non-finite (so can huge finite
        // values, overflowing it: then the elements themselves decide).
        let sum = t.abs()?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite()
            && t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|x| !x.is_finite())
        {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
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
    gradients_of(&loss.backward()?, params)
}

/// Each parameter's gradient from a finished backward pass, in order (see
/// [`gradients`]).
pub fn gradients_of(
    store: &candle_core::backprop::GradStore,
    params: &[(String, Var)],
) -> Result<Vec<Tensor>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass f32 update equals the tensor expression it replaces.
    #[test]
    fn fused_update_matches_the_tensor_path() {
        let dev = Device::Cpu;
        let t = |seed: f32| {
            let data: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Tensor::from_vec(data, (20, 15), &dev).unwrap()
        };
        let (p, m, g) = (t(0.1), t(0.2), t(0.3));
        let v = t(0.4).sqr().unwrap();
        let (b1, b2, lr, wd, eps) = (0.9f64, 0.95f64, 1e-3f64, 0.1f64, 1e-8f64);
        let (bc1, bc2_sqrt) = (1.0 - b1.powi(3), (1.0 - b2.powi(3)).sqrt());
        let k = StepConsts {
            beta1: b1 as f32,
            beta2: b2 as f32,
            decay: (1.0 - lr * wd) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: eps as f32,
            step_size: (lr / bc1) as f32,
        };
        let (w1, m1, v1) = step_f32_cpu(&p, &m, &v, &g, &k).unwrap().unwrap();
        let m2 = ((&m * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
        let v2 = ((&v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
        let denom = ((v2.sqrt().unwrap() / bc2_sqrt).unwrap() + eps).unwrap();
        let w2 = ((&p * (1.0 - lr * wd)).unwrap() - ((&m2 / denom).unwrap() * (lr / bc1)).unwrap())
            .unwrap();
        for (a, b) in [(w1, w2), (m1, m2), (v1, v2)] {
            let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }
}
