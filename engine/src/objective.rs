//! From examples to losses: how SFT, DPO and RM batches become rows, target
//! tokens and per-sequence sums. Recipes, tests and benchmarks all go through
//! here, so the fixture-checked math is the math that trains.

use candle_core::Tensor;

use crate::batch::{Batch, Row};
use crate::chat::Encoded;
use crate::error::{EngineError, Result};
use crate::loss::{self, DpoOutput, RmOutput, Targets};
use crate::model::Llama;

/// Number of leading prompt tokens (target mask 0) of a sequence.
pub fn prompt_len(seq: &Encoded) -> usize {
    seq.target_mask.iter().take_while(|m| **m == 0).count()
}

/// How many leading tokens a pair's two sequences share before either
/// has a target: what runs once for both. A template may put a format
/// token (Llama 2's space) before a completion, so the two sides' first
/// targets need not be at the same position.
pub fn shared_prompt_len(a: &Encoded, b: &Encoded) -> usize {
    let cap = prompt_len(a).min(prompt_len(b));
    a.ids
        .iter()
        .zip(&b.ids)
        .take(cap)
        .take_while(|(x, y)| x == y)
        .count()
}

/// log p(target) for each target: the LM head runs only on the hidden
/// states that predict a target (prompt positions of SFT and DPO rows need
/// no logits), and no [B*T, V] logits tensor is gathered from.
fn target_logprobs(model: &Llama, hidden: &Tensor, targets: &Targets) -> Result<Tensor> {
    if targets.is_empty() {
        return Err(EngineError::Input("no target tokens to score".into()));
    }
    let (b, t, h) = hidden.dims3()?;
    let preds = Tensor::new(targets.preds.as_slice(), hidden.device())?;
    let rows = hidden.reshape((b * t, h))?.index_select(&preds, 0)?; // [M, H]
    Ok(rows_logprobs(model, &rows, &targets.ids)?.0)
}

/// log p(ids[m]) from the hidden state `rows[m]` [M, H] that predicts it,
/// and the logits [M, V] where they were computed whole (a trained head; a
/// frozen one computes them a chunk at a time and keeps none).
pub(crate) fn rows_logprobs(
    model: &Llama,
    rows: &Tensor,
    ids: &[u32],
) -> Result<(Tensor, Option<Tensor>)> {
    if let Some(head) = model
        .frozen_f32_head()
        .filter(|_| crate::fused::usable(rows))
    {
        let ids = Tensor::new(ids, rows.device())?;
        return Ok((crate::fused::head_logprob(rows, &head, &ids)?, None));
    }
    let logits = model.lm_logits(rows)?;
    Ok((loss::row_logprobs(&logits, ids)?, Some(logits)))
}

/// SFT: token-mean cross entropy over target tokens of the batch.
/// Returns the loss and the number of target tokens.
pub fn sft_loss(model: &Llama, seqs: &[Encoded], pad_id: u32) -> Result<(Tensor, usize)> {
    let rows: Vec<Row> = seqs.iter().map(|s| Row::causal(&s.ids)).collect();
    let batch = Batch::collate(&rows, pad_id, &model.device)?;
    let mut targets = Targets::default();
    for (r, s) in seqs.iter().enumerate() {
        for j in 1..s.ids.len() {
            if s.target_mask[j] == 1 {
                targets.push(r * batch.len + j - 1, s.ids[j]);
            }
        }
    }
    if targets.is_empty() {
        return Err(EngineError::Input("SFT batch has no target tokens".into()));
    }
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let lp = target_logprobs(model, &h, &targets)?;
    Ok((loss::sft_loss(&lp)?, targets.len()))
}

/// SFT with several examples packed per row (block-diagonal attention,
/// positions restarting), rows filled greedily up to `max_len` tokens.
pub fn sft_loss_packed(
    model: &Llama,
    seqs: &[Encoded],
    pad_id: u32,
    max_len: usize,
) -> Result<(Tensor, usize)> {
    let mut rows: Vec<Row> = vec![];
    let mut placed: Vec<(usize, usize)> = vec![]; // (row, start) per seq
    for s in seqs {
        if s.len() > max_len {
            return Err(EngineError::Input(format!(
                "sequence of {} tokens exceeds max_len {max_len}",
                s.len()
            )));
        }
        if rows
            .last()
            .map(|r| r.len() + s.len() > max_len)
            .unwrap_or(true)
        {
            rows.push(Row::default());
        }
        let r = rows.len() - 1;
        let seg = rows[r].segments.last().map(|x| x + 1).unwrap_or(1);
        let start = rows[r].push_document(&s.ids, seg);
        placed.push((r, start));
    }
    let batch = Batch::collate(&rows, pad_id, &model.device)?;
    let mut targets = Targets::default();
    for (s, (r, start)) in seqs.iter().zip(&placed) {
        for j in 1..s.ids.len() {
            if s.target_mask[j] == 1 {
                targets.push(r * batch.len + start + j - 1, s.ids[j]);
            }
        }
    }
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let lp = target_logprobs(model, &h, &targets)?;
    Ok((loss::sft_loss(&lp)?, targets.len()))
}

/// A DPO pair: full sequences (prompt + completion) sharing their prompt.
#[derive(Debug, Clone)]
pub struct Pair {
    pub chosen: Encoded,
    pub rejected: Encoded,
}

/// Per-sequence log-prob sums a DPO step needs.
pub struct DpoLogps {
    /// Sums over DPO tokens (completion, minus format tokens when masking).
    pub chosen: Tensor, // [N]
    pub rejected: Tensor, // [N]
    /// Sum over chosen completion tokens (format included), and their count.
    pub nll_sum: Tensor, // scalar
    pub nll_tokens: usize,
}

/// Score DPO pairs. With `share_prompt`, each prompt runs once and chosen
/// and rejected attend to its cached keys and values (same numbers, less
/// compute); otherwise every sequence is its own row.
pub fn dpo_logps(
    model: &Llama,
    pairs: &[Pair],
    mask_format: bool,
    share_prompt: bool,
    pad_id: u32,
) -> Result<DpoLogps> {
    if share_prompt {
        return dpo_logps_shared_prompt(model, pairs, mask_format, pad_id);
    }
    let n = pairs.len();
    let mut rows = vec![];
    // (row, row index of token j's predecessor) resolved per sequence below.
    let mut layout: Vec<[(usize, Vec<usize>); 2]> = vec![];
    for p in pairs {
        let mut sides = vec![];
        for seq in [&p.chosen, &p.rejected] {
            let r = rows.len();
            rows.push(Row::causal(&seq.ids));
            sides.push((
                r,
                (0..seq.len())
                    .map(|j| j.saturating_sub(1))
                    .collect::<Vec<_>>(),
            ));
        }
        let b = sides.pop().expect("two sides");
        let a = sides.pop().expect("two sides");
        layout.push([a, b]);
    }
    let batch = Batch::collate(&rows, pad_id, &model.device)?;
    let mut targets = Targets::default();
    // weights: rows 0..n chosen, n..2n rejected, 2n nll.
    let mut owners: Vec<(usize, f32, f32)> = vec![]; // (sequence slot, dpo weight, nll weight)
    for (i, p) in pairs.iter().enumerate() {
        for (side, seq) in [&p.chosen, &p.rejected].into_iter().enumerate() {
            let (r, preds) = &layout[i][side];
            for j in 1..seq.len() {
                if seq.target_mask[j] == 0 {
                    continue;
                }
                let (dpo_w, nll_w) = dpo_weights(seq, j, side, mask_format);
                targets.push(r * batch.len + preds[j], seq.ids[j]);
                owners.push((side * n + i, dpo_w, nll_w));
            }
        }
    }
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let lp = target_logprobs(model, &h, &targets)?;
    dpo_sums(&lp, &owners, n, &model.device)
}

/// Per-sequence sums of per-target log-probs: `owners[k]` is (sequence slot:
/// 0..n chosen, n..2n rejected; DPO weight; NLL weight) of target k.
fn dpo_sums(
    lp: &Tensor,
    owners: &[(usize, f32, f32)],
    n: usize,
    device: &candle_core::Device,
) -> Result<DpoLogps> {
    let m = owners.len();
    let mut weights = vec![vec![0f32; m]; 2 * n + 1];
    let mut nll_tokens = 0;
    for (k, (slot, dw, nw)) in owners.iter().enumerate() {
        weights[*slot][k] = *dw;
        weights[2 * n][k] = *nw;
        nll_tokens += (*nw > 0.0) as usize;
    }
    let sums = loss::per_sequence_sum(lp, &weights, device)?;
    Ok(DpoLogps {
        chosen: sums.narrow(0, 0, n)?,
        rejected: sums.narrow(0, n, n)?,
        nll_sum: sums.get(2 * n)?,
        nll_tokens,
    })
}

/// Reference log-prob sums for DPO, computed once without a graph.
pub fn reference_logps(
    model: &Llama,
    pairs: &[Pair],
    mask_format: bool,
    share_prompt: bool,
    pad_id: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let l = dpo_logps(model, pairs, mask_format, share_prompt, pad_id)?;
    let f32s = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.detach().to_dtype(candle_core::DType::F32)?.to_vec1()?)
    };
    Ok((f32s(&l.chosen)?, f32s(&l.rejected)?))
}

/// DPO + NLL on a batch with cached reference sums.
pub fn dpo_loss(
    model: &Llama,
    pairs: &[Pair],
    ref_chosen: &[f32],
    ref_rejected: &[f32],
    beta: f64,
    nll_weight: f64,
    mask_format: bool,
    pad_id: u32,
) -> Result<DpoOutput> {
    let l = dpo_logps(model, pairs, mask_format, true, pad_id)?;
    loss::dpo_loss(loss::DpoInputs {
        policy_chosen: &l.chosen,
        policy_rejected: &l.rejected,
        ref_chosen,
        ref_rejected,
        nll_logprob_sum: &l.nll_sum,
        nll_tokens: l.nll_tokens,
        beta,
        nll_weight,
    })
}

/// A ranked RM example: prompt ids and 2-3 completions (ids), best first.
#[derive(Debug, Clone)]
pub struct Ranked {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    pub margin: f32,
}

/// Rewards of every response, flattened in example order, and for each
/// example the indices of its responses best first. `packed`: one row per
/// example, prompt once, responses in `order[e]` (a permutation, e.g. a
/// seeded shuffle) each seeing only the prompt and itself.
pub fn rm_rewards(
    model: &Llama,
    examples: &[Ranked],
    packed: bool,
    orders: Option<&[Vec<usize>]>,
    pad_id: u32,
) -> Result<(Tensor, Vec<Vec<usize>>)> {
    let mut rows = vec![];
    let mut last_tok = vec![]; // (row, position) per response, in example/rank order
    for (e, ex) in examples.iter().enumerate() {
        if ex.responses.len() < 2 {
            return Err(EngineError::Input(format!(
                "example {e}: a ranking needs at least 2 responses"
            )));
        }
        if ex.prompt.is_empty() || ex.responses.iter().any(|r| r.is_empty()) {
            return Err(EngineError::Input(format!(
                "example {e}: empty prompt or response"
            )));
        }
        if packed {
            let mut row = Row::causal(&ex.prompt);
            let order: Vec<usize> = orders
                .map(|o| o[e].clone())
                .unwrap_or_else(|| (0..ex.responses.len()).collect());
            let mut ends = vec![0; ex.responses.len()];
            for (slot, &resp) in order.iter().enumerate() {
                let start = row.push_branch(&ex.responses[resp], slot as u32 + 1, ex.prompt.len());
                ends[resp] = start + ex.responses[resp].len() - 1;
            }
            let r = rows.len();
            rows.push(row);
            last_tok.extend(ends.into_iter().map(|p| (r, p)));
        } else {
            for resp in &ex.responses {
                let mut ids = ex.prompt.clone();
                ids.extend_from_slice(resp);
                let r = rows.len();
                rows.push(Row::causal(&ids));
                last_tok.push((r, ids.len() - 1));
            }
        }
    }
    let batch = Batch::collate(&rows, pad_id, &model.device)?;
    let flat: Vec<u32> = last_tok
        .iter()
        .map(|(r, p)| (r * batch.len + p) as u32)
        .collect();
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let rewards = model.rewards_at(&h, &flat)?;
    let mut ranked = vec![];
    let mut k = 0;
    for ex in examples {
        ranked.push((k..k + ex.responses.len()).collect());
        k += ex.responses.len();
    }
    Ok((rewards, ranked))
}

pub fn rm_loss(
    model: &Llama,
    examples: &[Ranked],
    packed: bool,
    orders: Option<&[Vec<usize>]>,
    pad_id: u32,
) -> Result<(RmOutput, Tensor)> {
    let (rewards, ranked) = rm_rewards(model, examples, packed, orders, pad_id)?;
    let margins: Vec<f32> = examples.iter().map(|e| e.margin).collect();
    Ok((loss::rm_loss(&rewards, &ranked, &margins)?, rewards))
}

/// Weight of target token j of one side of a DPO pair: (dpo weight, nll weight).
fn dpo_weights(seq: &Encoded, j: usize, side: usize, mask_format: bool) -> (f32, f32) {
    let dpo_w = if mask_format && seq.format_mask[j] == 1 {
        0.0
    } else {
        1.0
    };
    (dpo_w, if side == 0 { 1.0 } else { 0.0 })
}

/// DPO log-prob sums with each prompt run once for its chosen and its
/// rejected completion (see `shared_prompt.rs`). Attention costs
/// P^2 + 2 P C + 2 C^2 per pair instead of (P + 2C)^2 for one packed row.
fn dpo_logps_shared_prompt(
    model: &Llama,
    pairs: &[Pair],
    mask_format: bool,
    pad_id: u32,
) -> Result<DpoLogps> {
    let n = pairs.len();
    if n == 0 {
        return Err(EngineError::Input("empty DPO batch".into()));
    }
    let mut prompts = Vec::with_capacity(n);
    for (i, p) in pairs.iter().enumerate() {
        let pc = shared_prompt_len(&p.chosen, &p.rejected);
        if pc == 0 {
            return Err(EngineError::Input(format!(
                "pair {i}: chosen and rejected do not share a prompt"
            )));
        }
        prompts.push(pc);
    }
    let dev = &model.device;
    // Completions: rows 0..N chosen, N..2N rejected.
    let seqs: Vec<(&Encoded, usize)> = (0..2)
        .flat_map(|side| {
            pairs
                .iter()
                .zip(&prompts)
                .map(move |(p, &pc)| (if side == 0 { &p.chosen } else { &p.rejected }, pc))
        })
        .collect();
    let prompt_ids: Vec<&[u32]> = pairs
        .iter()
        .zip(&prompts)
        .map(|(p, &pc)| &p.chosen.ids[..pc])
        .collect();
    let completions: Vec<(usize, &[u32])> = seqs
        .iter()
        .enumerate()
        .map(|(r, (seq, pc))| (r % n, &seq.ids[*pc..]))
        .collect();
    let shared = crate::shared_prompt::forward(model, &prompt_ids, &completions, pad_id)?;
    let mut targets = Targets::default();
    let mut owners: Vec<(usize, f32, f32)> = vec![];
    for (r, (seq, pc)) in seqs.iter().enumerate() {
        let (side, i) = (r / n, r % n);
        for j in *pc..seq.len() {
            if seq.target_mask[j] == 0 {
                continue;
            }
            targets.push(shared.pred(i, *pc, r, j - pc), seq.ids[j]);
            let (dw, nw) = dpo_weights(seq, j, side, mask_format);
            owners.push((side * n + i, dw, nw));
        }
    }
    let all = shared.hidden.unsqueeze(0)?; // [1, N*P + 2N*C, H]
    let lp = target_logprobs(model, &all, &targets)?;
    dpo_sums(&lp, &owners, n, dev)
}
