//! Batched generation with a KV cache: greedy or temperature/top-p sampling
//! with a seed, each row stopping at its own `<|eot_id|>`/`<|eom_id|>`.
//!
//! Prompts are left-padded to one length; padding sees only itself and real
//! tokens never see padding, and RoPE positions count real tokens only, so a
//! row's output does not depend on what it was batched with.

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
    // Nucleus: smallest set of most likely tokens whose mass reaches top_p.
    probs.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    let mut keep = probs.len();
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p.1;
            if acc >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
    }
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
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(EngineError::Input(
            "cannot generate from an empty prompt".into(),
        ));
    }
    let dev = &model.device;
    let b = prompts.len();
    let p = prompts.iter().map(|x| x.len()).max().unwrap_or(0);
    let limit = model.config.max_position_embeddings;
    if p + cfg.max_new_tokens > limit {
        return Err(EngineError::Input(format!(
            "prompt of {p} tokens + {} new exceeds max_position_embeddings {limit}",
            cfg.max_new_tokens
        )));
    }
    let mut rng = Rng::new(cfg.seed);
    // valid[r][k]: key position k of row r is a real token.
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    let (mut ids, mut pos) = (Vec::with_capacity(b * p), Vec::with_capacity(b * p));
    for pr in prompts {
        let pad = p - pr.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(pr);
        pos.extend(std::iter::repeat_n(0u32, pad));
        pos.extend(0..pr.len() as u32);
        valid.push((0..p).map(|k| k >= pad).collect());
    }
    let mut bias = vec![MASKED; b * p * p];
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
        &Tensor::from_vec(ids, (b, p), dev)?,
        &Tensor::from_vec(pos, (b, p), dev)?,
        &Tensor::from_vec(bias, (b, 1, p, p), dev)?,
        Some(&mut cache),
    )?;
    let mut last = model.lm_logits(&hidden.narrow(1, p - 1, 1)?)?; // [B, 1, V]
    let mut next_pos: Vec<u32> = prompts.iter().map(|x| x.len() as u32).collect();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
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
            out[r].push(tok);
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
    Ok(out)
}
