//! One optimizer step done right, shared by every training recipe:
//! gradient accumulation, a check that every parameter got a gradient (on
//! the first step), non-finite loss detection naming the step, global-norm
//! clipping, the LR schedule, AdamW.

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::optim::{clip_grad_norm, gradients_of, AdamW, AdamWConfig, Decay, LrSchedule};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub steps: u64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Max global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub grad_accum: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-5,
            steps: 100,
            warmup_steps: 0,
            decay: Decay::Cosine,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            grad_clip: 1.0,
            grad_accum: 1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean of the micro-batch losses, before this step's update.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

pub struct Trainer {
    pub config: TrainConfig,
    opt: AdamW,
    schedule: LrSchedule,
    step: u64,
}

impl Trainer {
    pub fn new(params: Vec<(String, candle_core::Var)>, config: TrainConfig) -> Result<Self> {
        if config.grad_accum == 0 {
            return Err(EngineError::Input("grad_accum must be at least 1".into()));
        }
        let opt = AdamW::new(
            params,
            AdamWConfig {
                lr: config.lr,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
                weight_decay: config.weight_decay,
            },
        )?;
        let schedule = LrSchedule {
            base: config.lr,
            warmup_steps: config.warmup_steps,
            total_steps: config.steps,
            decay: config.decay,
            min_ratio: config.min_lr_ratio,
        };
        Ok(Trainer {
            config,
            opt,
            schedule,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// One update. `micro(i)` returns the loss of micro-batch i (of
    /// `grad_accum`); gradients are averaged over micro-batches.
    pub fn step(&mut self, micro: impl FnMut(usize) -> Result<Tensor>) -> Result<StepStats> {
        self.step_with(micro, |_| Ok(()))
    }

    /// One update whose backward passes `finish` completes (activation
    /// checkpointing: [`crate::Llama::finish_backward`]).
    pub fn step_with(
        &mut self,
        mut micro: impl FnMut(usize) -> Result<Tensor>,
        mut finish: impl FnMut(&mut candle_core::backprop::GradStore) -> Result<()>,
    ) -> Result<StepStats> {
        let n = self.config.grad_accum;
        let mut total: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        for i in 0..n {
            let (value, grads) = self.micro_grads(micro(i)?, &mut finish)?;
            loss_sum += value;
            total = Some(add_grads(total, grads)?);
        }
        self.update(total.expect("grad_accum >= 1"), loss_sum)
    }

    /// [`Trainer::step_with`] with `width` micro-batches at a time on the
    /// thread pool (forward and backward each), their gradients summed in
    /// micro-batch order, so the update is the one `step_with` makes. For
    /// models whose every product is too small to keep the cores busy on its
    /// own; it holds `width` micro-batches' activations and gradients.
    pub fn step_parallel(
        &mut self,
        width: usize,
        micro: impl Fn(usize) -> Result<Tensor> + Sync,
        finish: impl Fn(&mut candle_core::backprop::GradStore) -> Result<()> + Sync,
    ) -> Result<StepStats> {
        use rayon::prelude::*;
        if width <= 1 {
            return self.step_with(micro, finish);
        }
        let n = self.config.grad_accum;
        let mut total: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let this = &*self;
        for wave in (0..n).collect::<Vec<_>>().chunks(width) {
            let done: Vec<Result<(f64, Vec<Tensor>)>> = wave
                .par_iter()
                .map(|i| this.micro_grads(micro(*i)?, &mut |s| finish(s)))
                .collect();
            for d in done {
                let (value, grads) = d?;
                loss_sum += value;
                total = Some(add_grads(total, grads)?);
            }
        }
        self.update(total.expect("grad_accum >= 1"), loss_sum)
    }

    /// One micro-batch's loss value and gradients (scaled by 1/grad_accum).
    fn micro_grads(
        &self,
        loss: Tensor,
        finish: &mut dyn FnMut(&mut candle_core::backprop::GradStore) -> Result<()>,
    ) -> Result<(f64, Vec<Tensor>)> {
        let n = self.config.grad_accum;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(EngineError::NonFinite {
                step: self.step + 1,
                value,
            });
        }
        let scaled = if n > 1 { (loss / n as f64)? } else { loss };
        let mut store = scaled.backward()?;
        finish(&mut store)?;
        Ok((value, gradients_of(&store, self.opt.params())?))
    }

    /// Clip, check and apply the summed gradients.
    fn update(&mut self, grads: Vec<Tensor>, loss_sum: f64) -> Result<StepStats> {
        let n = self.config.grad_accum;
        let step_no = self.step + 1;
        let mut grads = grads;
        let grad_norm = clip_grad_norm(&mut grads, self.config.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFinite {
                step: step_no,
                value: grad_norm,
            });
        }
        let lr = self.schedule.lr(self.step);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        Ok(StepStats {
            loss: loss_sum / n as f64,
            grad_norm,
            lr,
        })
    }
}

/// acc + grads, parameter by parameter (grads alone at first).
fn add_grads(acc: Option<Vec<Tensor>>, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
    Ok(match acc {
        None => grads,
        Some(acc) => acc
            .iter()
            .zip(&grads)
            .map(|(a, g)| a + g)
            .collect::<candle_core::Result<_>>()?,
    })
}

/// Below this many weights a model's products are too small to keep the
/// cores busy one at a time (the GRPO bench's 4M-weight model: training
/// 1.84 s a step with one micro-batch at a time, 1.50 s with two side by side
/// on 2 threads, `cargo bench -p herd-daemon --bench grpo_bench`).
const SMALL_MODEL_PARAMS: usize = 50_000_000;

/// How many micro-batches [`Trainer::step_parallel`] should run side by
/// side: one per pool thread for a small model on the CPU, else one (an
/// accelerator, or products that fill the cores on their own, where more
/// would only hold more activations). Also one where forward passes share
/// state that order matters to: activation checkpointing's pending passes,
/// LoRA dropout's seeded stream.
pub fn micro_batch_width(model: &crate::Llama, micro_batches: usize) -> usize {
    let ordered =
        model.is_checkpointing() || model.lora.as_ref().is_some_and(|l| l.config.dropout > 0.0);
    if !ordered && model.device.is_cpu() && model.num_params() < SMALL_MODEL_PARAMS {
        rayon::current_num_threads().clamp(1, micro_batches.max(1))
    } else {
        1
    }
}
