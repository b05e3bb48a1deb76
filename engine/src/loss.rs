//! The post-training losses, as the Llama 3 recipe and TRL define them.
//!
//! All of them score *target tokens*: a token is predicted from the logits at
//! its predecessor's row position (normally the token before it; in a packed
//! row, a branch's first token is predicted from the last prompt token).
//! Log-probs are computed only for the tokens a loss needs, then summed per
//! sequence with a weight matrix, so masking is just a weight of 0.

use candle_core::{Device, Tensor, D};

use crate::error::{EngineError, Result};
use crate::ops::log_sigmoid;

/// Which tokens to score: flat predecessor index (row * T + pos) and target id.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub preds: Vec<u32>,
    pub ids: Vec<u32>,
}

impl Targets {
    pub fn push(&mut self, pred: usize, id: u32) -> usize {
        self.preds.push(pred as u32);
        self.ids.push(id);
        self.preds.len() - 1
    }
    pub fn len(&self) -> usize {
        self.preds.len()
    }
    pub fn is_empty(&self) -> bool {
        self.preds.is_empty()
    }
}

/// log p(ids[m]) under the logits of row m: rows [M, V] -> [M].
pub fn row_logprobs(rows: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let ids = Tensor::new(ids, rows.device())?;
    if crate::fused::usable(rows) {
        return Ok(crate::fused::target_logprob(rows, &ids)?);
    }
    let max = rows.max_keepdim(D::Minus1)?.detach();
    let lse = (rows
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?; // [M, 1]
    Ok(rows.gather(&ids.unsqueeze(1)?, 1)?.sub(&lse)?.squeeze(1)?)
}

/// Weighted sums of per-target values per sequence: weights [S][M] -> [S].
pub fn per_sequence_sum(values: &Tensor, weights: &[Vec<f32>], device: &Device) -> Result<Tensor> {
    let m = values.dim(0)?;
    let s = weights.len();
    let flat: Vec<f32> = weights.iter().flat_map(|w| w.iter().copied()).collect();
    if flat.len() != s * m {
        return Err(EngineError::Input(format!(
            "weights are {} values, expected {s} x {m}",
            flat.len()
        )));
    }
    let w = Tensor::from_vec(flat, (s, m), device)?.to_dtype(values.dtype())?;
    Ok(w.matmul(&values.unsqueeze(1)?)?.squeeze(1)?)
}

/// SFT: cross entropy averaged over every target token in the batch.
pub fn sft_loss(logprobs: &Tensor) -> Result<Tensor> {
    Ok(logprobs.mean_all()?.neg()?)
}

/// DPO (sigmoid) plus NLL on chosen, as TRL's loss_type=["sigmoid","sft"].
pub struct DpoInputs<'a> {
    /// Policy log-prob sums over the DPO tokens: [N] chosen, [N] rejected.
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    /// Reference log-prob sums (precomputed, no gradient).
    pub ref_chosen: &'a [f32],
    pub ref_rejected: &'a [f32],
    /// Sum of chosen completion log-probs (format tokens included) and count.
    pub nll_logprob_sum: &'a Tensor,
    pub nll_tokens: usize,
    pub beta: f64,
    pub nll_weight: f64,
}

pub struct DpoOutput {
    pub loss: Tensor,
    pub dpo_loss: f64,
    pub nll: f64,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
}

impl DpoOutput {
    pub fn reward_accuracy(&self) -> f64 {
        let n = self.chosen_rewards.len().max(1);
        self.chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .filter(|(c, r)| c > r)
            .count() as f64
            / n as f64
    }
    pub fn reward_margin(&self) -> f64 {
        let n = self.chosen_rewards.len().max(1) as f64;
        self.chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .map(|(c, r)| (c - r) as f64)
            .sum::<f64>()
            / n
    }
}

pub fn dpo_loss(x: DpoInputs) -> Result<DpoOutput> {
    let dev = x.policy_chosen.device();
    let n = x.ref_chosen.len();
    let dt = x.policy_chosen.dtype();
    let rc = Tensor::new(x.ref_chosen, dev)?.to_dtype(dt)?;
    let rr = Tensor::new(x.ref_rejected, dev)?.to_dtype(dt)?;
    let chosen = (x.policy_chosen - &rc)?; // log-ratio of chosen
    let rejected = (x.policy_rejected - &rr)?;
    let logits = ((&chosen - &rejected)? * x.beta)?;
    let dpo = log_sigmoid(&logits)?.neg()?.mean_all()?;
    if x.nll_tokens == 0 {
        return Err(EngineError::Input(
            "DPO batch has no chosen completion tokens".into(),
        ));
    }
    let nll = (x.nll_logprob_sum.neg()? / x.nll_tokens as f64)?;
    let loss = (&dpo + (&nll * x.nll_weight)?)?;
    let f32s = |t: &Tensor| -> Result<Vec<f32>> {
        Ok((t.detach() * x.beta)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?)
    };
    let (chosen_rewards, rejected_rewards) = (f32s(&chosen)?, f32s(&rejected)?);
    debug_assert_eq!(chosen_rewards.len(), n);
    Ok(DpoOutput {
        dpo_loss: dpo.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
        nll: nll.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
        loss,
        chosen_rewards,
        rejected_rewards,
    })
}

/// Bradley-Terry over every ordered pair of each example's ranked responses.
/// `rewards[e]` holds indices into the flat reward vector, best first;
/// `margins[e]` is subtracted inside the sigmoid (0 = no margin, Llama 3).
pub struct RmOutput {
    pub loss: Tensor,
    pub pairs: usize,
    pub correct: usize,
}

pub fn rm_loss(rewards: &Tensor, ranked: &[Vec<usize>], margins: &[f32]) -> Result<RmOutput> {
    let dev = rewards.device();
    let (mut better, mut worse, mut margin) = (vec![], vec![], vec![]);
    for (e, order) in ranked.iter().enumerate() {
        for i in 0..order.len() {
            for j in i + 1..order.len() {
                better.push(order[i] as u32);
                worse.push(order[j] as u32);
                margin.push(margins.get(e).copied().unwrap_or(0.0));
            }
        }
    }
    if better.is_empty() {
        return Err(EngineError::Input(
            "reward-model batch has no ranked pairs".into(),
        ));
    }
    let pairs = better.len();
    let rb = rewards.index_select(&Tensor::new(better.as_slice(), dev)?, 0)?;
    let rw = rewards.index_select(&Tensor::new(worse.as_slice(), dev)?, 0)?;
    let diff = (&rb - &rw)?;
    let margin = Tensor::new(margin.as_slice(), dev)?.to_dtype(diff.dtype())?;
    let loss = log_sigmoid(&diff.broadcast_sub(&margin)?)?
        .neg()?
        .mean_all()?;
    let correct = diff
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .filter(|d| **d > 0.0)
        .count();
    Ok(RmOutput {
        loss,
        pairs,
        correct,
    })
}
