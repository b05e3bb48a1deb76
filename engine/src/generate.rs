//! Batched generation with a KV cache: greedy or temperature/top-p sampling
//! with a seed, each row stopping at its own `<|eot_id|>`/`<|eom_id|>`.
//!
//! Prompts are left-padded to one length; padding sees only itself and real
//! tokens never see padding, and RoPE positions count real tokens only, so a
//! row's output does not depend on what it was batched with.
//!
//! Rejection sampling draws K continuations of each prompt: [`generate_many`]
//! runs each prompt's prefill once and copies its cached keys and values to
//! its K rows, which then decode as one batch (transformers' `generate`
//! with `num_return_sequences` runs the prompt K times).

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};
use crate::model::{KvCache, Llama};
use crate::ops::MASKED;
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Tokens that end a row (kept in its output). Empty: never stop early.
    pub stop_ids: Vec<u32>,
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> Self {
        SamplingConfig {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids,
        }
    }
}

/// Most likely first, ties by id: the total order the nucleus is cut from.
fn likelier(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// The nucleus (top-p): the most likely tokens, in [`likelier`] order,
/// whose mass first reaches `top_p`, as a mask over the vocabulary.
///
/// Found by repeated selection instead of sorting (a 128k vocabulary sorted
/// per row per step dominated sampling): split the undecided tokens at
/// their middle one; if the likelier half (with it) brings the mass to
/// `top_p` the cut is in there, else all of it is kept and the rest is
/// searched. Linear in the vocabulary; the same cut as sorting everything
/// and summing in order, but for sums that land within rounding of `top_p`.
fn nucleus(probs: &[f64], top_p: f64) -> Vec<bool> {
    let mut order: Vec<(u32, f64)> = probs
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32, *p))
        .collect();
    // order[..lo] is kept; the cut lies in order[lo..hi].
    let (mut lo, mut hi, mut kept_mass) = (0, order.len(), 0.0);
    while hi - lo > 32 {
        let mid = (hi - lo) / 2;
        order[lo..hi].select_nth_unstable_by(mid, likelier);
        let front: f64 = order[lo..=lo + mid].iter().map(|p| p.1).sum();
        if kept_mass + front >= top_p {
            hi = lo + mid + 1;
        } else {
            kept_mass += front;
            lo += mid + 1;
        }
    }
    order[lo..hi].sort_unstable_by(likelier);
    let mut cut = hi;
    for (i, p) in order[lo..hi].iter().enumerate() {
        kept_mass += p.1;
        if kept_mass >= top_p {
            cut = lo + i + 1;
            break;
        }
    }
    let mut mask = vec![false; probs.len()];
    for (id, _) in &order[..cut] {
        mask[*id as usize] = true;
    }
    mask
}

fn pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut weights = vec![0f32; logits.len()];
    crate::fused::tempered_weights(logits, cfg.temperature as f32, &mut weights);
    let mut probs: Vec<f64> = weights.iter().map(|w| *w as f64).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        // Outside the nucleus a token has no chance.
        let mask = nucleus(&probs, cfg.top_p);
        for (p, keep) in probs.iter_mut().zip(mask) {
            if !keep {
                *p = 0.0;
            }
        }
    }
    // Inverse CDF over the kept tokens, in id order.
    let mass: f64 = probs.iter().sum();
    let mut u = rng.uniform() as f64 * mass;
    let mut last = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            u -= p;
            last = i;
            if u <= 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
}

/// New tokens for each prompt (stop token included when one was hit).
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    pad_id: u32,
) -> Result<Vec<Vec<u32>>> {
    let counts = vec![1; prompts.len()];
    Ok(generate_many(model, prompts, &counts, cfg, pad_id)?
        .into_iter()
        .map(|mut rows| rows.pop().expect("one row per prompt"))
        .collect())
}

/// `counts[i]` continuations of each prompt `i` (a count may be 0), its
/// prefill run once. Rows are decoded together; continuation `j` of prompt
/// `i` draws from its own random stream ([`row_stream`]), so a seed gives the
/// same tokens for the same prompts and counts, and a row's draws do not
/// depend on the other rows.
pub fn generate_many(
    model: &Llama,
    prompts: &[Vec<u32>],
    counts: &[usize],
    cfg: &SamplingConfig,
    pad_id: u32,
) -> Result<Vec<Vec<Vec<u32>>>> {
    generate_from(model, prompts, counts, cfg, pad_id, 0)
}

/// The random stream of continuation `sample` of prompt `prompt`.
fn row_stream(seed: u64, prompt: usize, sample: usize) -> Rng {
    Rng::stream(seed, ((prompt as u64) << 32) | sample as u64)
}

/// [`generate_many`] for prompts that start at index `first_prompt` of a
/// larger list: the rows draw from that list's streams.
fn generate_from(
    model: &Llama,
    prompts: &[Vec<u32>],
    counts: &[usize],
    cfg: &SamplingConfig,
    pad_id: u32,
    first_prompt: usize,
) -> Result<Vec<Vec<Vec<u32>>>> {
    if prompts.len() != counts.len() {
        return Err(EngineError::Input(format!(
            "{} prompts but {} counts",
            prompts.len(),
            counts.len()
        )));
    }
    // Prompts with no continuation wanted take no part.
    let live: Vec<usize> = (0..prompts.len()).filter(|i| counts[*i] > 0).collect();
    let mut out: Vec<Vec<Vec<u32>>> = counts.iter().map(|c| vec![vec![]; *c]).collect();
    if live.is_empty() {
        return Ok(out);
    }
    if live.iter().any(|i| prompts[*i].is_empty()) {
        return Err(EngineError::Input(
            "cannot generate from an empty prompt".into(),
        ));
    }
    let dev = &model.device;
    let np = live.len();
    let p = live.iter().map(|i| prompts[*i].len()).max().unwrap_or(0);
    let limit = model.config.max_position_embeddings;
    if p + cfg.max_new_tokens > limit {
        return Err(EngineError::Input(format!(
            "prompt of {p} tokens + {} new exceeds max_position_embeddings {limit}",
            cfg.max_new_tokens
        )));
    }
    // valid[r][k]: key position k of prompt r is a real token.
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(np);
    let (mut ids, mut pos) = (Vec::with_capacity(np * p), Vec::with_capacity(np * p));
    for i in &live {
        let pr = &prompts[*i];
        let pad = p - pr.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(pr);
        pos.extend(std::iter::repeat_n(0u32, pad));
        pos.extend(0..pr.len() as u32);
        valid.push((0..p).map(|k| k >= pad).collect());
    }
    let mut bias = vec![MASKED; np * p * p];
    for (r, v) in valid.iter().enumerate() {
        for q in 0..p {
            for k in 0..=q {
                if (v[q] && v[k]) || k == q {
                    bias[(r * p + q) * p + k] = 0.0;
                }
            }
        }
    }
    let mut cache = KvCache::with_capacity(p);
    let hidden = model.forward_hidden(
        &Tensor::from_vec(ids, (np, p), dev)?,
        &Tensor::from_vec(pos, (np, p), dev)?,
        &Tensor::from_vec(bias, (np, 1, p, p), dev)?,
        Some(&mut cache),
    )?;
    let last = model.lm_logits(&hidden.narrow(1, p - 1, 1)?)?; // [np, 1, V]

    // Each prompt's logits and mask copied to its rows: row -> (prompt, sample).
    let rows: Vec<(usize, usize)> = live
        .iter()
        .enumerate()
        .flat_map(|(r, i)| (0..counts[*i]).map(move |j| (r, j)))
        .collect();
    let b = rows.len();
    let mut last = last;
    let owner: Vec<u32> = rows.iter().map(|(r, _)| *r as u32).collect();
    if b != np {
        last = last.index_select(&Tensor::new(owner.as_slice(), dev)?, 0)?;
        valid = rows.iter().map(|(r, _)| valid[*r].clone()).collect();
    }
    // The rows read their prompt's keys and values where the prefill left
    // them (one copy per prompt) and write their own after.
    let mut cache = cache.branch(owner, cfg.max_new_tokens)?;
    let mut next_pos: Vec<u32> = rows
        .iter()
        .map(|(r, _)| prompts[live[*r]].len() as u32)
        .collect();
    let mut rngs: Vec<Rng> = rows
        .iter()
        .map(|(r, j)| row_stream(cfg.seed, first_prompt + live[*r], *j))
        .collect();
    let mut gen: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let logits = last.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut feed = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                feed.push(pad_id);
                continue;
            }
            let tok = pick(&logits[r], cfg, &mut rngs[r]);
            gen[r].push(tok);
            if cfg.stop_ids.contains(&tok) {
                done[r] = true;
            }
            feed.push(tok);
        }
        if done.iter().all(|d| *d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let tk = p + step + 1;
        let mut bias = Vec::with_capacity(b * tk);
        for (r, v) in valid.iter_mut().enumerate() {
            v.push(!done[r]);
            bias.extend(
                v.iter()
                    .enumerate()
                    .map(|(k, ok)| if *ok || k == tk - 1 { 0.0 } else { MASKED }),
            );
        }
        let hidden = model.forward_hidden(
            &Tensor::from_vec(feed, (b, 1), dev)?,
            &Tensor::from_vec(next_pos.clone(), (b, 1), dev)?,
            &Tensor::from_vec(bias, (b, 1, 1, tk), dev)?,
            Some(&mut cache),
        )?;
        next_pos.iter_mut().for_each(|x| *x += 1);
        last = model.lm_logits(&hidden)?;
    }
    for ((r, j), tokens) in rows.into_iter().zip(gen) {
        out[live[r]][j] = tokens;
    }
    Ok(out)
}

/// Continuations of many prompts, as rejection sampling draws them:
/// `counts[i]` of prompt `i`. Whole prompts go to calls of at most
/// `rows_per_call` rows (at least one prompt each), each call running every
/// prompt's prefill once ([`generate_many`]). Calls run side by side on the
/// thread pool: decoding a few rows of a small model is too little work to
/// spread one call's matrix products over cores, and the calls are
/// independent. Every row draws from its own stream of `cfg.seed`, so the
/// result does not depend on how many calls run at once, and the draws not
/// on how the prompts are split into calls (the logits can, in the last bit,
/// as matrix products of other sizes sum in another order).
pub fn sample_many(
    model: &Llama,
    prompts: &[Vec<u32>],
    counts: &[usize],
    cfg: &SamplingConfig,
    pad_id: u32,
    rows_per_call: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<Vec<u32>>>> {
    use rayon::prelude::*;
    if prompts.len() != counts.len() {
        return Err(EngineError::Input(format!(
            "{} prompts but {} counts",
            prompts.len(),
            counts.len()
        )));
    }
    // Calls: ranges of whole prompts.
    let mut calls: Vec<std::ops::Range<usize>> = vec![];
    let mut first = 0;
    while first < prompts.len() {
        let (mut last, mut rows) = (first + 1, counts[first]);
        while last < prompts.len() && rows + counts[last] <= rows_per_call {
            rows += counts[last];
            last += 1;
        }
        calls.push(first..last);
        first = last;
    }
    let done: Vec<Vec<Vec<Vec<u32>>>> = calls
        .par_iter()
        .map(|range| {
            let out = generate_from(
                model,
                &prompts[range.clone()],
                &counts[range.clone()],
                cfg,
                pad_id,
                range.start,
            )?;
            progress(counts[range.clone()].iter().sum());
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(done.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus as first written: the whole vocabulary sorted, summed
    /// in order.
    fn nucleus_by_sorting(probs: &[f64], top_p: f64) -> Vec<bool> {
        let mut order: Vec<(u32, f64)> = probs
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32, *p))
            .collect();
        order.sort_by(likelier);
        let mut acc = 0.0;
        let keep = order
            .iter()
            .position(|p| {
                acc += p.1;
                acc >= top_p
            })
            .map_or(order.len(), |i| i + 1);
        let mut mask = vec![false; probs.len()];
        for (id, _) in &order[..keep] {
            mask[*id as usize] = true;
        }
        mask
    }

    /// Selection finds the nucleus sorting finds: flat and peaked
    /// distributions, ties, small and large vocabularies and nuclei.
    #[test]
    fn selected_nucleus_equals_the_sorted_one() {
        let mut gen = Rng::new(3);
        for case in 0..300 {
            let vocab = [5, 33, 300, 4096][case % 4];
            let spread = [0.01f32, 1.0, 8.0][case % 3];
            let mut logits: Vec<f64> = (0..vocab).map(|_| (gen.normal() * spread) as f64).collect();
            if case % 5 == 0 {
                logits[vocab / 2] = logits[0]; // a tie
            }
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = e.iter().sum();
            let probs: Vec<f64> = e.iter().map(|x| x / total).collect();
            for top_p in [0.1, 0.5, 0.9, 0.95, 0.999] {
                assert_eq!(
                    nucleus(&probs, top_p),
                    nucleus_by_sorting(&probs, top_p),
                    "case {case}, top_p {top_p}"
                );
            }
        }
    }

    /// Sampling keeps to the nucleus and follows the probabilities.
    #[test]
    fn samples_come_from_the_nucleus_in_proportion() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -8.0];
        let cfg = SamplingConfig {
            max_new_tokens: 1,
            temperature: 1.0,
            top_p: 0.9,
            seed: 0,
            stop_ids: vec![],
        };
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 5];
        for _ in 0..20_000 {
            counts[pick(&logits, &cfg, &mut rng) as usize] += 1;
        }
        // Probabilities 0.643, 0.237, 0.087, 0.032, 0.0: the first two hold
        // 0.88 < 0.9, so the nucleus is {0, 1, 2}.
        assert_eq!(counts[3] + counts[4], 0, "{counts:?}");
        let share0 = counts[0] as f64 / 20_000.0;
        assert!((share0 - 0.643 / 0.967).abs() < 0.02, "{counts:?}");
    }
}
