//! Completions that share a prompt, each prompt run once.
//!
//! The prompts go through the model as one batch, keeping their keys and
//! values; then the completions go as one batch whose rows attend to their
//! prompt's cached keys and values (gradients flow back into the prompt
//! through them) and causally to themselves. For k completions of a P-token
//! prompt that is P + k·C tokens instead of k·(P + C), and attention
//! P² + k·(P·C + C²) instead of k·(P + C)². DPO (k = 2: chosen, rejected)
//! and GRPO (k = the group) use it.

use candle_core::Tensor;

use crate::batch::{Batch, Row};
use crate::error::{EngineError, Result};
use crate::model::{KvCache, Llama};

/// The hidden states of prompts and their completions.
pub struct SharedPrompts {
    /// [N·P + R·C, H]: the N prompts' rows (each right-padded to P), then
    /// the R completions' rows (each right-padded to C).
    pub hidden: Tensor,
    prompts: usize,
    prompt_len: usize,
    completion_len: usize,
}

impl SharedPrompts {
    /// The row of `hidden` that predicts token `q` of completion `r`, whose
    /// prompt `i` has `len` tokens: the prompt's last row for the first
    /// token, else the completion's row before it.
    pub fn pred(&self, i: usize, len: usize, r: usize, q: usize) -> usize {
        if q == 0 {
            i * self.prompt_len + len - 1
        } else {
            self.prompts * self.prompt_len + r * self.completion_len + q - 1
        }
    }
}

/// Run `prompts` once and `completions` (each: its prompt's index, its
/// tokens) after them.
pub fn forward(
    model: &Llama,
    prompts: &[&[u32]],
    completions: &[(usize, &[u32])],
    pad_id: u32,
) -> Result<SharedPrompts> {
    let n = prompts.len();
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(EngineError::Input(format!("prompt {i} is empty")));
    }
    if let Some((r, (i, _))) = completions.iter().enumerate().find(|(_, (i, _))| *i >= n) {
        return Err(EngineError::Input(format!(
            "completion {r} names prompt {i} of {n}"
        )));
    }
    let dev = &model.device;
    let rows: Vec<Row> = prompts.iter().map(|p| Row::causal(p)).collect();
    let prompt_batch = Batch::collate(&rows, pad_id, dev)?;
    let big_p = prompt_batch.len;
    let mut cache = KvCache::default();
    let hp = model.forward_hidden(
        &prompt_batch.ids,
        &prompt_batch.positions,
        &prompt_batch.bias,
        Some(&mut cache),
    )?; // [N, P, H]
    let r_n = completions.len();
    let big_c = completions
        .iter()
        .map(|(_, c)| c.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let tk = big_p + big_c;
    let mut ids = Vec::with_capacity(r_n * big_c);
    let mut pos = Vec::with_capacity(r_n * big_c);
    let mut bias = vec![crate::ops::MASKED; r_n * big_c * tk];
    for (r, (i, c)) in completions.iter().enumerate() {
        let pc = prompts[*i].len();
        for q in 0..big_c {
            ids.push(c.get(q).copied().unwrap_or(pad_id));
            pos.push((pc + q) as u32);
            let base = (r * big_c + q) * tk;
            if q < c.len() {
                bias[base..base + pc].fill(0.0); // the real prompt tokens
                bias[base + big_p..base + big_p + q + 1].fill(0.0); // causal
            } else {
                bias[base + big_p + q] = 0.0; // padding sees itself only
            }
        }
    }
    let ids = Tensor::from_vec(ids, (r_n, big_c), dev)?;
    let pos = Tensor::from_vec(pos, (r_n, big_c), dev)?;
    let bias = Tensor::from_vec(bias, (r_n, 1, big_c, tk), dev)?;
    // Each prompt's keys and values, copied to the rows that continue it
    // (index_select: the copies' gradients add up in the prompt's).
    let owner: Vec<u32> = completions.iter().map(|(i, _)| *i as u32).collect();
    let owner = Tensor::new(owner.as_slice(), dev)?;
    let mut branch_cache = KvCache {
        layers: cache
            .layers
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .map(|(k, v)| Ok((k.index_select(&owner, 0)?, v.index_select(&owner, 0)?)))
                    .transpose()
            })
            .collect::<candle_core::Result<_>>()?,
        ..KvCache::default()
    };
    let hc = model.forward_hidden(&ids, &pos, &bias, Some(&mut branch_cache))?; // [R, C, H]
    let h = hp.dims3()?.2;
    let hidden = Tensor::cat(
        &[&hp.reshape((n * big_p, h))?, &hc.reshape((r_n * big_c, h))?],
        0,
    )?;
    Ok(SharedPrompts {
        hidden,
        prompts: n,
        prompt_len: big_p,
        completion_len: big_c,
    })
}
