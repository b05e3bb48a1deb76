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
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, v)| (i, (((*v - max) as f64) / cfg.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    // Most likely first, ties by id: a total order, so the kept prefix is
    // the same whether the whole vocabulary is sorted or only its head.
    let order = |a: &(usize, f64), b: &(usize, f64)| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    // Nucleus: smallest set of most likely tokens whose mass reaches top_p.
    // Sort only a head of the vocabulary, growing it until it holds that
    // mass (a 128k vocabulary sorted per row per step would dominate).
    let mut keep = probs.len();
    if cfg.top_p < 1.0 {
        let mut head = 64.min(probs.len());
        loop {
            if head < probs.len() {
                probs.select_nth_unstable_by(head - 1, order);
            }
            probs[..head].sort_by(order);
            let mut acc = 0.0;
            let reached = probs[..head].iter().position(|p| {
                acc += p.1;
                acc >= cfg.top_p
            });
            if let Some(i) = reached {
                keep = i + 1;
                break;
            }
            if head == probs.len() {
                break;
            }
            head = (head * 4).min(probs.len());
        }
    }
    // (With top_p = 1 every token is kept and the walk goes in id order.)
    let kept = &probs[..keep];
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() as f64 * mass;
    for p in kept {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    kept[kept.len() - 1].0 as u32
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
/// prefill run once. Rows are decoded together, prompt by prompt in order
/// and each prompt's rows in order; sampling draws for them in that order,
/// so a seed gives the same tokens for the same prompts and counts.
pub fn generate_many(
    model: &Llama,
    prompts: &[Vec<u32>],
    counts: &[usize],
    cfg: &SamplingConfig,
    pad_id: u32,
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
    let mut rng = Rng::new(cfg.seed);
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
    let mut cache = KvCache::default();
    let hidden = model.forward_hidden(
        &Tensor::from_vec(ids, (np, p), dev)?,
        &Tensor::from_vec(pos, (np, p), dev)?,
        &Tensor::from_vec(bias, (np, 1, p, p), dev)?,
        Some(&mut cache),
    )?;
    let last = model.lm_logits(&hidden.narrow(1, p - 1, 1)?)?; // [np, 1, V]
    // Each prompt's cache, logits and mask copied to its rows: row -> (prompt, sample).
    let rows: Vec<(usize, usize)> = live
        .iter()
        .enumerate()
        .flat_map(|(r, i)| (0..counts[*i]).map(move |j| (r, j)))
        .collect();
    let b = rows.len();
    let mut last = last;
    if b != np {
        let idx = Tensor::from_vec(
            rows.iter().map(|(r, _)| *r as u32).collect::<Vec<u32>>(),
            b,
            dev,
        )?;
        for layer in cache.layers.iter_mut() {
            if let Some((k, v)) = layer.take() {
                *layer = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        last = last.index_select(&idx, 0)?;
        valid = rows.iter().map(|(r, _)| valid[*r].clone()).collect();
    }
    let mut next_pos: Vec<u32> = rows
        .iter()
        .map(|(r, _)| prompts[live[*r]].len() as u32)
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
            let tok = pick(&logits[r], cfg, &mut rng);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus as first written: the whole vocabulary sorted.
    fn pick_full_sort(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, v)| (i, (((*v - max) as f64) / cfg.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p.1;
                acc >= cfg.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let mut u = rng.uniform() as f64 * mass;
        for p in kept {
            u -= p.1;
            if u <= 0.0 {
                return p.0 as u32;
            }
        }
        kept[kept.len() - 1].0 as u32
    }

    /// Sorting only the head of the vocabulary keeps the same nucleus, in
    /// the same order, so the same draw picks the same token: flat and
    /// peaked distributions, ties, nuclei larger than the first head.
    #[test]
    fn head_sorted_nucleus_equals_the_full_sort() {
        let mut gen = Rng::new(3);
        for case in 0..200 {
            let vocab = [5, 64, 300, 4096][case % 4];
            let spread = [0.01f32, 1.0, 8.0][case % 3];
            let mut logits: Vec<f32> = (0..vocab).map(|_| gen.normal() * spread).collect();
            if case % 5 == 0 {
                logits[vocab / 2] = logits[0]; // a tie
            }
            for top_p in [0.1, 0.5, 0.9, 0.999] {
                let cfg = SamplingConfig {
                    max_new_tokens: 1,
                    temperature: 0.8,
                    top_p,
                    seed: 0,
                    stop_ids: vec![],
                };
                let (mut a, mut b) = (Rng::new(case as u64), Rng::new(case as u64));
                for _ in 0..5 {
                    assert_eq!(
                        pick(&logits, &cfg, &mut a),
                        pick_full_sort(&logits, &cfg, &mut b),
                        "case {case}, top_p {top_p}"
                    );
                }
            }
        }
    }
}
