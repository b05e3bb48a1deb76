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
    pub fn bounds() -> Vec<super::recipe::Bound> {
        use super::recipe::Bound;
        vec![
            Bound::closed("temperature", 0.0, 100.0),
            Bound::above("top_p", 0.0, 1.0),
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

/// `n` completions (text) per prompt; see [`complete_counts`].
/// `k`, samples per prompt, at least `min` (rejection sampling needs two
/// to choose from): the check and its bound for `/kinds`, from one place.
pub fn check_k(k: usize, min: usize) -> std::result::Result<(), String> {
    in_range("k", k, min, limits::MAX_SAMPLES_PER_PROMPT)
}

pub fn k_bound(min: usize) -> super::recipe::Bound {
    super::recipe::Bound::closed("k", min as f64, limits::MAX_SAMPLES_PER_PROMPT as f64)
}

pub fn complete(
    model: &herd_engine::Llama,
    chat: &ChatFormat,
    prompts: &[Vec<herd_engine::chat::Message>],
    n: usize,
    g: &GenParams,
    seed: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<String>>> {
    let counted: Vec<(&[herd_engine::chat::Message], usize)> =
        prompts.iter().map(|p| (p.as_slice(), n)).collect();
    complete_counts(model, chat, &counted, g, seed, progress)
}

/// `count` completions (text) of each prompt. Each call to the engine takes
/// whole prompts, as many as fit `batch_size` rows (at least one), and runs
/// each prompt's prefill once for all its rows; calls run side by side on
/// the worker's threads; deterministic for a seed (each row draws from its
/// own stream of it), whatever the thread count.
pub fn complete_counts(
    model: &herd_engine::Llama,
    chat: &ChatFormat,
    prompts: &[(&[herd_engine::chat::Message], usize)],
    g: &GenParams,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<String>>> {
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(p, _)| Ok(chat.encode_prompt(p)?.ids))
        .collect::<Result<_>>()?;
    let counts: Vec<usize> = prompts.iter().map(|(_, n)| *n).collect();
    let total: usize = counts.iter().sum();
    let cfg = herd_engine::generate::SamplingConfig {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed,
        stop_ids: chat.stop_ids(),
    };
    // Calls finish on pool threads: generation runs on a scoped thread and
    // this one reports (the sink stays on the thread that owns it).
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let generated = std::thread::scope(|scope| {
        let encoded = &encoded;
        let counts = &counts;
        let cfg = &cfg;
        let worker = scope.spawn(move || {
            let tx = std::sync::Mutex::new(tx);
            herd_engine::generate::sample_many(
                model,
                encoded,
                counts,
                cfg,
                chat.special.pad,
                g.batch_size,
                &|n| {
                    let _ = tx.lock().expect("progress channel").send(n);
                },
            )
        });
        let mut done = 0;
        for n in rx {
            done += n;
            progress(done, total);
        }
        worker.join().expect("generation thread panicked")
    })?;
    generated
        .into_iter()
        .map(|rows| {
            rows.iter()
                .map(|ids| Ok(chat.decode(ids)?.trim().to_string()))
                .collect()
        })
        .collect()
}

/// RM scores of completions: one packed row per prompt (prompt once).
pub fn score(
    rm: &herd_engine::Llama,
    chat: &ChatFormat,
    prompt: &[herd_engine::chat::Message],
    completions: &[String],
) -> Result<Vec<f32>> {
    let texts: Vec<&str> = completions.iter().map(String::as_str).collect();
    let (p, responses) = chat.encode_exchange(prompt, &texts)?;
    let p = p.ids;
    let responses: Vec<Vec<u32>> = responses.into_iter().map(|x| x.ids).collect();
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
