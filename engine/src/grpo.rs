//! GRPO: group-relative advantages and the clipped surrogate loss, as TRL's
//! `GRPOTrainer` computes them (`_generate_and_score_completions` for the
//! advantages, `_compute_loss` for the loss), so a run here and there on the
//! same rollouts takes the same step.
//!
//! A rollout is a prompt, one sampled completion, and what the step needs
//! about it: its advantage, the sampler's per-token log-probs (`old`, for
//! importance ratios when a batch is reused, μ > 1) and the reference's (for
//! the KL term). Per completion token t with ratio r = exp(logp - old):
//!
//! ```text
//! loss_t = -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A) + β·(exp(ref-logp) - (ref-logp) - 1)
//! ```
//!
//! and the tokens' losses are summed with the weights `loss_type` gives
//! (TRL's normalisations): `grpo` averages each completion over its tokens,
//! then the completions; `bnpo` averages over all the batch's tokens;
//! `dr_grpo` divides by completions × `max_completion_length`; `dapo` by the
//! tokens of the whole generation batch. TRL then divides all but `dapo` by
//! the gradient-accumulation steps; here the trainer divides every
//! micro-batch's loss by them (herd's `Trainer` does), so the loss returned
//! is TRL's before that division, and `dapo`'s is multiplied by the
//! micro-batches to match.
//!
//! Log-probs are of the logits divided by the sampling temperature (TRL
//! scales them so the ratio compares like with like). Only tokens inside
//! the completion mask are scored: the others carry no loss and no
//! gradient either way.

use candle_core::{Device, Tensor};

use crate::batch::{Batch, Row};
use crate::error::{EngineError, Result};
use crate::loss::Targets;
use crate::model::Llama;

/// How a group's rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Minus the group's mean (GRPO, Dr. GRPO).
    GroupMean,
    /// Minus the mean of the group's other completions (RLOO).
    LeaveOneOut,
}

/// What the centred rewards are divided by (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The group's standard deviation (+1e-4).
    Group,
    /// The whole batch's standard deviation (+1e-4).
    Batch,
    /// Nothing (Dr. GRPO).
    None,
}

/// How token losses are normalised (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

/// Advantages of `rewards`, laid out group after group of `group` each;
/// also the fraction of groups whose rewards were all equal (their
/// advantages are zero: nothing to learn from them).
pub fn advantages(
    rewards: &[f32],
    group: usize,
    baseline: Baseline,
    scale: Scale,
) -> Result<(Vec<f32>, f32)> {
    if group < 2 || rewards.is_empty() || !rewards.len().is_multiple_of(group) {
        return Err(EngineError::Input(format!(
            "{} rewards do not make groups of {group} (at least 2)",
            rewards.len()
        )));
    }
    // Torch's std: the unbiased estimate (n - 1).
    let std = |xs: &[f32]| {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|x| *x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        var.sqrt() as f32
    };
    let batch_std = std(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    let mut flat_groups = 0;
    for g in rewards.chunks(group) {
        let sum: f32 = g.iter().sum();
        let mean = sum / group as f32;
        let g_std = std(g);
        if g_std.abs() <= 1e-8 {
            flat_groups += 1;
        }
        for &r in g {
            let centred = match baseline {
                Baseline::GroupMean => r - mean,
                Baseline::LeaveOneOut => r - (sum - r) / (group - 1) as f32,
            };
            out.push(match scale {
                Scale::Group => centred / (g_std + 1e-4),
                Scale::Batch => centred / (batch_std + 1e-4),
                Scale::None => centred,
            });
        }
    }
    Ok((out, flat_groups as f32 / (rewards.len() / group) as f32))
}

/// One sampled completion, as a step trains on it.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Per completion token: whether it counts (up to and including the
    /// first stop token; none of a truncated completion with
    /// `mask_truncated_completions`).
    pub mask: Vec<bool>,
    pub advantage: f32,
    /// The sampling policy's log-probs of the counted tokens (None: the
    /// current policy's, detached, so every ratio is 1: μ = 1).
    pub old_logps: Option<Vec<f32>>,
    /// The reference's log-probs of the counted tokens (needed when β > 0).
    pub ref_logps: Option<Vec<f32>>,
}

impl Rollout {
    /// Counted completion tokens.
    pub fn counted(&self) -> usize {
        self.mask.iter().filter(|m| **m).count()
    }
}

/// The loss's settings.
#[derive(Debug, Clone, Copy)]
pub struct GrpoLoss {
    pub epsilon_low: f32,
    pub epsilon_high: f32,
    pub beta: f32,
    pub temperature: f32,
    pub loss_type: LossType,
    /// The longest completion sampling allows (`dr_grpo`'s normaliser).
    pub max_completion_length: usize,
    /// Counted tokens of the whole generation batch (`dapo`'s normaliser).
    pub tokens_in_batch: usize,
    /// Micro-batches the optimizer step is split into (see the module doc).
    pub micro_batches: usize,
}

/// A micro-batch's loss and what TRL logs of it (masked means over the
/// counted tokens).
pub struct GrpoOutput {
    pub loss: Tensor,
    pub kl: f32,
    pub clip_low: f32,
    pub clip_high: f32,
    pub clip_region: f32,
    pub entropy: f32,
    /// Counted tokens.
    pub tokens: usize,
    /// The policy's log-probs of the counted tokens, flat in rollout order
    /// (before this step's update: the sampler's, for the record).
    pub logps: Vec<f32>,
}

/// Log-probs (at `temperature`) of each rollout's counted completion
/// tokens, flat in rollout order, and the hidden states' rows that predict
/// them (for the entropy). A group's completions share their prompt, which
/// then runs once for all of them (`shared_prompt.rs`): with groups of 8,
/// 128-token prompts and 128-token completions, 44% fewer tokens.
fn counted_logps(
    model: &Llama,
    rollouts: &[Rollout],
    pad_id: u32,
    temperature: f32,
) -> Result<CountedLogps> {
    for (i, r) in rollouts.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(EngineError::Input(format!("rollout {i} has no prompt")));
        }
        if r.mask.len() != r.completion.len() {
            return Err(EngineError::Input(format!(
                "rollout {i}: {} mask entries for {} completion tokens",
                r.mask.len(),
                r.completion.len()
            )));
        }
    }
    // Each distinct prompt once, in order of first use.
    let mut prompts: Vec<&[u32]> = vec![];
    let owner: Vec<usize> = rollouts
        .iter()
        .map(
            |r| match prompts.iter().position(|p| *p == r.prompt.as_slice()) {
                Some(i) => i,
                None => {
                    prompts.push(&r.prompt);
                    prompts.len() - 1
                }
            },
        )
        .collect();
    let mut targets = Targets::default();
    let hidden = if prompts.len() < rollouts.len() {
        let completions: Vec<(usize, &[u32])> = owner
            .iter()
            .zip(rollouts)
            .map(|(&i, r)| (i, r.completion.as_slice()))
            .collect();
        let shared = crate::shared_prompt::forward(model, &prompts, &completions, pad_id)?;
        for (k, r) in rollouts.iter().enumerate() {
            for (j, (&id, &m)) in r.completion.iter().zip(&r.mask).enumerate() {
                if m {
                    targets.push(shared.pred(owner[k], r.prompt.len(), k, j), id);
                }
            }
        }
        shared.hidden
    } else {
        let rows: Vec<Row> = rollouts
            .iter()
            .map(|r| Row::causal(&[r.prompt.as_slice(), r.completion.as_slice()].concat()))
            .collect();
        let batch = Batch::collate(&rows, pad_id, &model.device)?;
        for (k, r) in rollouts.iter().enumerate() {
            for (j, (&id, &m)) in r.completion.iter().zip(&r.mask).enumerate() {
                if m {
                    targets.push(k * batch.len + r.prompt.len() + j - 1, id);
                }
            }
        }
        let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
        let (b, t, d) = h.dims3()?;
        h.reshape((b * t, d))?
    };
    if targets.is_empty() {
        return Err(EngineError::Input(
            "no completion token counts in this batch".into(),
        ));
    }
    let preds = Tensor::new(targets.preds.as_slice(), hidden.device())?;
    // Logits are linear in the hidden state (no bias): scaling the rows
    // scales the logits.
    let rows = (hidden.index_select(&preds, 0)? / temperature as f64)?; // [M, D]
    let (lp, logits) = crate::objective::rows_logprobs(model, &rows, &targets.ids)?;
    Ok(CountedLogps { lp, rows, logits })
}

/// The counted tokens' log-probs [M], the hidden rows that predict them
/// [M, D] (scaled by 1/temperature) and, where the head computed them
/// whole, their logits [M, V].
struct CountedLogps {
    lp: Tensor,
    rows: Tensor,
    logits: Option<Tensor>,
}

/// Each rollout's log-probs (at `temperature`) of its counted tokens, no
/// gradient: the sampler's `old` log-probs, or the reference's.
pub fn rollout_logps(
    model: &Llama,
    rollouts: &[Rollout],
    pad_id: u32,
    temperature: f32,
) -> Result<Vec<Vec<f32>>> {
    let flat: Vec<f32> = counted_logps(model, rollouts, pad_id, temperature)?
        .lp
        .detach()
        .to_vec1()?;
    let mut out = Vec::with_capacity(rollouts.len());
    let mut at = 0;
    for r in rollouts {
        let n = r.counted();
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    Ok(out)
}

/// Mean entropy of the next-token distributions (no gradient): from the
/// logits where the head computed them whole, else from `rows` a few
/// hundred at a time, so no [M, V] tensor is held whole.
fn mean_entropy(model: &Llama, counted: &CountedLogps) -> Result<f32> {
    let sum = |logits: &Tensor| -> Result<f64> {
        let logits = logits.detach();
        let ent = if crate::fused::usable(&logits) {
            crate::fused::row_entropy(&logits)?
        } else {
            let logp = log_softmax_rows(&logits)?;
            (logp.exp()? * &logp)?.sum(1)?.neg()?
        };
        Ok(ent
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?)
    };
    let rows = &counted.rows;
    let m = rows.dim(0)?;
    let total = match &counted.logits {
        Some(logits) => sum(logits)?,
        None => {
            let mut total = 0f64;
            for start in (0..m).step_by(256) {
                let n = 256.min(m - start);
                total += sum(&model.lm_logits(&rows.detach().narrow(0, start, n)?)?)?;
            }
            total
        }
    };
    Ok((total / m as f64) as f32)
}

/// Row-wise log-softmax from differentiable ops.
fn log_softmax_rows(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The GRPO loss of one micro-batch of rollouts.
pub fn grpo_loss(
    model: &Llama,
    rollouts: &[Rollout],
    pad_id: u32,
    cfg: &GrpoLoss,
) -> Result<GrpoOutput> {
    let counted = counted_logps(model, rollouts, pad_id, cfg.temperature)?;
    let logps = &counted.lp;
    let current: Vec<f32> = logps.detach().to_vec1()?;
    let device: &Device = logps.device();
    let m = current.len();
    // Per counted token: old and reference log-probs, advantage, weight.
    let (mut old, mut refs, mut adv, mut weight) = (
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
    );
    let rows_n = rollouts.len() as f32;
    let counted_total: usize = rollouts.iter().map(Rollout::counted).sum();
    for (i, r) in rollouts.iter().enumerate() {
        let n = r.counted();
        let at = old.len();
        match &r.old_logps {
            Some(o) if o.len() == n => old.extend_from_slice(o),
            Some(o) => {
                return Err(EngineError::Input(format!(
                    "rollout {i}: {} old log-probs for {n} counted tokens",
                    o.len()
                )))
            }
            None => old.extend_from_slice(&current[at..at + n]),
        }
        match (&r.ref_logps, cfg.beta != 0.0) {
            (Some(x), _) if x.len() == n => refs.extend_from_slice(x),
            (_, false) => refs.extend(std::iter::repeat_n(0.0, n)),
            (x, true) => {
                return Err(EngineError::Input(format!(
                    "rollout {i}: β > 0 needs the reference's log-probs of its {n} counted tokens (got {})",
                    x.as_ref().map_or(0, |x| x.len())
                )))
            }
        }
        adv.extend(std::iter::repeat_n(r.advantage, n));
        let w = match cfg.loss_type {
            LossType::Grpo => 1.0 / (n.max(1) as f32 * rows_n),
            LossType::Bnpo => 1.0 / counted_total.max(1) as f32,
            LossType::DrGrpo => 1.0 / (rows_n * cfg.max_completion_length as f32),
            LossType::Dapo => cfg.micro_batches.max(1) as f32 / cfg.tokens_in_batch.max(1) as f32,
        };
        weight.extend(std::iter::repeat_n(w, n));
    }
    // Which side of the min each token takes is decided on values, so the
    // clipped side is a constant (its gradient is zero, as clamp's is
    // outside its range); at a tie the unclipped side carries it all,
    // which is what torch's even split of min's gradient sums to.
    let (lo, hi) = (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let (mut unclipped, mut clipped_term) = (vec![0f32; m], vec![0f32; m]);
    let (mut low, mut high) = (0usize, 0usize);
    for t in 0..m {
        let ratio = (current[t] - old[t]).exp();
        let clamped = ratio.clamp(lo, hi);
        if ratio * adv[t] <= clamped * adv[t] {
            unclipped[t] = 1.0;
        } else {
            clipped_term[t] = clamped * adv[t];
        }
        low += usize::from(ratio < lo && adv[t] < 0.0);
        high += usize::from(ratio > hi && adv[t] > 0.0);
    }
    let v = |x: Vec<f32>| Tensor::from_vec(x, m, device);
    let ratio = (logps - v(old)?)?.exp()?;
    let adv_t = v(adv)?;
    // -min(r·A, clip(r)·A), the min resolved above.
    let surrogate = ((ratio * &adv_t)? * v(unclipped)?)?
        .add(&v(clipped_term)?)?
        .neg()?;
    let (per_token, kl) = if cfg.beta != 0.0 {
        let d = (v(refs)? - logps)?;
        let kl_t = ((d.exp()? - &d)? - 1.0)?;
        let kl_mean = kl_t.detach().mean_all()?.to_scalar::<f32>()?;
        ((surrogate + (kl_t * cfg.beta as f64)?)?, kl_mean)
    } else {
        (surrogate, 0.0)
    };
    let loss = (per_token * v(weight)?)?.sum_all()?;
    let frac = |k: usize| k as f32 / m as f32;
    Ok(GrpoOutput {
        loss,
        kl,
        clip_low: frac(low),
        clip_high: frac(high),
        clip_region: frac(low + high),
        entropy: mean_entropy(model, &counted)?,
        tokens: m,
        logps: current,
    })
}
