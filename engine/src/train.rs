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
        let step_no = self.step + 1;
        let mut total: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        for i in 0..n {
            let loss = micro(i)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(EngineError::NonFinite {
                    step: step_no,
                    value,
                });
            }
            loss_sum += value;
            let scaled = if n > 1 { (loss / n as f64)? } else { loss };
            let mut store = scaled.backward()?;
            finish(&mut store)?;
            let grads = gradients_of(&store, self.opt.params())?;
            total = Some(match total {
                None => grads,
                Some(acc) => acc
                    .iter()
                    .zip(&grads)
                    .map(|(a, g)| a + g)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = total.expect("grad_accum >= 1");
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
