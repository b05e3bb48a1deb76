//! What the generating recipes share: sampling settings, batched
//! completions per prompt, and reward-model scores.

use anyhow::Result;
use herd_engine::chat::ChatFormat;
use serde::{Deserialize, Serialize};

use super::training::{in_range, limits};

/// Sampling settings shared by the jobs that generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Rows per generation call.
    pub batch_size: usize,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            temperature: 0.8,
            top_p: 0.95,
            max_new_tokens: 64,
            batch_size: 16,
        }
    }
}

impl GenParams {
    /// What `validate` enforces (see `Bound`).
    pub fn bounds() -> Vec<super::Bound> {
        use super::Bound;
        vec![
            Bound::closed("temperature", 0.0, 100.0),
            Bound {
                name: "top_p",
                min: 0.0,
                min_inclusive: false,
                max: Some(1.0),
                max_inclusive: true,
            },
            Bound::closed("max_new_tokens", 1.0, limits::MAX_NEW_TOKENS as f64),
            Bound::closed("batch_size", 1.0, limits::MAX_BATCH as f64),
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite())
            || !(self.top_p > 0.0 && self.top_p <= 1.0)
        {
            return Err("temperature must be >= 0 and top_p in (0, 1]".into());
        }
        if self.temperature > 100.0 {
            return Err("temperature must be <= 100".into());
        }
        in_range(
            "max_new_tokens",
            self.max_new_tokens,
            1,
            limits::MAX_NEW_TOKENS,
        )?;
        in_range("batch_size", self.batch_size, 1, limits::MAX_BATCH)?;
        Ok(())
    }
}

/// `n` completions (text) per prompt, generated in batches; deterministic
/// for a seed (each batch gets seed + batch index).
pub fn complete(
    model: &herd_engine::Llama,
    chat: &ChatFormat,
    prompts: &[Vec<herd_engine::chat::Message>],
    n: usize,
    g: &GenParams,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<String>>> {
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Ok(chat.encode_prompt(p)?.ids))
        .collect::<Result<_>>()?;
    let rows: Vec<usize> = (0..prompts.len())
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let mut out: Vec<Vec<String>> = vec![vec![]; prompts.len()];
    let total = rows.len();
    for (bi, chunk) in rows.chunks(g.batch_size).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|i| encoded[*i].clone()).collect();
        let cfg = herd_engine::generate::SamplingConfig {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            seed: seed.wrapping_add(bi as u64),
            stop_ids: chat.stop_ids(),
        };
        let gen = herd_engine::generate::generate(model, &batch, &cfg, chat.special.pad)?;
        for (i, ids) in chunk.iter().zip(gen) {
            out[*i].push(chat.decode(&ids)?.trim().to_string());
        }
        progress((bi * g.batch_size + chunk.len()).min(total), total);
    }
    Ok(out)
}

/// RM scores of completions: one packed row per prompt (prompt once).
pub fn score(
    rm: &herd_engine::Llama,
    chat: &ChatFormat,
    prompt: &[herd_engine::chat::Message],
    completions: &[String],
) -> Result<Vec<f32>> {
    let p = chat.encode_prompt(prompt)?.ids;
    let responses: Vec<Vec<u32>> = completions
        .iter()
        .map(|c| Ok(chat.encode_completion(c)?.ids))
        .collect::<Result<_>>()?;
    let mut out = vec![];
    // rm_rewards wants >= 2 responses per row; score in rows of up to 16.
    for chunk in responses.chunks(16) {
        let mut resp = chunk.to_vec();
        let real = resp.len();
        if real == 1 {
            resp.push(resp[0].clone());
        }
        let ex = herd_engine::objective::Ranked {
            prompt: p.clone(),
            responses: resp,
            margin: 0.0,
        };
        let (r, _) = herd_engine::objective::rm_rewards(rm, &[ex], true, None, chat.special.pad)?;
        out.extend(r.to_vec1::<f32>()?.into_iter().take(real));
    }
    Ok(out)
}
