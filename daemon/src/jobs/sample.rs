//! `sample`: rejection sampling (Llama 3 §4.2.2). K samples per prompt from
//! the policy, each scored by the reward model; the best becomes SFT data.
//!
//! The K samples of a prompt share its prefill (one prompt pass, K rows
//! decoded off its cached keys and values). A prompt with system prompts
//! varies them across its samples (sample `i` gets `system[i % len]`, one
//! prefill per system prompt); the kept row carries the system prompt its
//! best sample was drawn with.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::{complete_counts, score, GenParams};
use super::inputs::{chat_of, load_rows, save_dataset};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{Dataset, PromptExample, SftExample};
use herd_core::{ArtifactKind, JobKind};
use herd_engine::chat::Message;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// Samples per prompt (the paper uses 10-30).
    pub k: usize,
    /// Where a prompt carries a checkable answer, only correct samples may be
    /// kept (Llama 3 filters reasoning traces by their final answer and code
    /// by execution); prompts with none are dropped and counted.
    pub require_correct: bool,
    #[serde(flatten)]
    pub gen: GenParams,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            k: 10,
            require_correct: false,
            gen: GenParams::default(),
        }
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        if self.k < 2 {
            return Err("k must be at least 2 (rejection sampling picks the best of k)".into());
        }
        super::generation::check_k(self.k, 2)?;
        self.gen.validate()
    }
    fn bounds() -> Vec<super::recipe::Bound> {
        let mut b = GenParams::bounds();
        b.push(super::generation::k_bound(2));
        b
    }
}

fn stats(xs: &[f64]) -> Value {
    if xs.is_empty() {
        return Value::Null;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"mean": mean, "std": std, "min": min, "max": max, "n": xs.len()})
}

/// The `sample` recipe.
pub struct Sample;

impl Recipe for Sample {
    type Params = Params;
    const KIND: JobKind = JobKind::Sample;
    const INPUTS: InputNames = InputNames::only(&["policy", "rm", "prompts"]);
    const OUTPUTS: &'static [(&'static str, OutputKind)] =
        &[("data", OutputKind::Is(ArtifactKind::Sft))];
    const ACCEPTS: Accepts = &[("prompts", &[ArtifactKind::Prompts])];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let rm_dir = ctx.input("rm")?.to_path_buf();
    let prompts: Vec<PromptExample> = load_rows(ctx.input("prompts")?)?;
    let chat = chat_of(&policy_dir)?;
    let rm_chat = chat_of(&rm_dir)?;
    // Each prompt's variants (one per system prompt it has, or itself
    // alone) with how many of its k samples each draws.
    let variants: Vec<Vec<(Vec<Message>, usize)>> = prompts
        .iter()
        .map(|x| {
            let v = x.system.len().max(1);
            (0..v.min(p.k))
                .map(|i| (x.messages(i), p.k / v + usize::from(i < p.k % v)))
                .collect()
        })
        .collect();
    let generated = {
        let policy = herd_engine::checkpoint::load_model(&policy_dir, &ctx.device)?;
        let flat: Vec<(&[Message], usize)> = variants
            .iter()
            .flatten()
            .map(|(m, n)| (m.as_slice(), *n))
            .collect();
        let sink = &mut *ctx.sink;
        complete_counts(&policy, &chat, &flat, &p.gen, ctx.seed, |d, t| {
            sink.progress(d as u64, t as u64)
        })?
    };
    // Per prompt: its samples, and the variant each was drawn with.
    let mut generated = generated.into_iter();
    let samples: Vec<(Vec<String>, Vec<usize>)> = variants
        .iter()
        .map(|vs| {
            let (mut texts, mut from) = (vec![], vec![]);
            for (v, _) in vs.iter().enumerate() {
                let g = generated.next().expect("one entry per variant");
                from.extend(std::iter::repeat_n(v, g.len()));
                texts.extend(g);
            }
            (texts, from)
        })
        .collect();
    let rm = herd_engine::checkpoint::load_model(&rm_dir, &ctx.device)?;
    if rm.score.is_none() {
        bail!(
            "input `rm` is not a reward model (its config is not LlamaForSequenceClassification)"
        );
    }
    let (mut all, mut best_scores, mut rows) = (vec![], vec![], vec![]);
    let (mut empty, mut correct_best, mut correct_any, mut checkable, mut none_correct) =
        (0, 0, 0.0, 0, 0);
    for ((prompt, (cands, from)), vs) in prompts.iter().zip(&samples).zip(&variants) {
        // Each sample scored after the dialog it was drawn from.
        let mut scores = vec![0.0; cands.len()];
        for (v, (messages, _)) in vs.iter().enumerate() {
            let idx: Vec<usize> = (0..cands.len()).filter(|i| from[*i] == v).collect();
            let texts: Vec<String> = idx.iter().map(|i| cands[*i].clone()).collect();
            for (i, s) in idx.iter().zip(score(&rm, &rm_chat, messages, &texts)?) {
                scores[*i] = s;
            }
        }
        all.extend(scores.iter().map(|s| *s as f64));
        // Best non-empty sample (first on ties).
        let eligible = |i: &usize| {
            !cands[*i].is_empty()
                && (!p.require_correct
                    || prompt
                        .answer
                        .as_ref()
                        .is_none_or(|a| crate::task::is_correct(&cands[*i], a)))
        };
        let best =
            (0..cands.len())
                .filter(eligible)
                .fold(None, |acc: Option<usize>, i| match acc {
                    Some(b) if scores[b] >= scores[i] => Some(b),
                    _ => Some(i),
                });
        let Some(best) = best else {
            if cands.iter().all(|c| c.is_empty()) {
                empty += 1
            } else {
                none_correct += 1
            }
            continue;
        };
        best_scores.push(scores[best] as f64);
        if let Some(ans) = &prompt.answer {
            checkable += 1;
            correct_best += crate::task::is_correct(&cands[best], ans) as usize;
            correct_any += cands
                .iter()
                .filter(|c| crate::task::is_correct(c, ans))
                .count() as f64
                / cands.len() as f64;
        }
        let mut messages = vs[from[best]].0.clone();
        messages.push(Message::new("assistant", &cands[best]));
        rows.push(SftExample::dialog(messages));
    }
    if rows.is_empty() {
        bail!("no sample of any prompt could be kept ({empty} prompts with only empty samples, {none_correct} with no correct sample)");
    }
    let mut points = vec![
        (
            "score_mean".to_string(),
            stats(&all)["mean"].as_f64().unwrap_or(0.0),
        ),
        (
            "best_score_mean".to_string(),
            stats(&best_scores)["mean"].as_f64().unwrap_or(0.0),
        ),
    ];
    let mut summary = json!({"prompts": prompts.len(), "k": p.k, "kept": rows.len(), "all_samples_empty": empty, "no_correct_sample": none_correct,
        "scores": stats(&all), "best_scores": stats(&best_scores)});
    if checkable > 0 {
        let (b, s) = (
            correct_best as f64 / checkable as f64,
            correct_any / checkable as f64,
        );
        points.push(("best_correct_rate".into(), b));
        points.push(("sample_correct_rate".into(), s));
        summary["best_correct_rate"] = b.into();
        summary["sample_correct_rate"] = s.into();
    }
    ctx.sink.metrics(0, &points)?;
    save_dataset(ctx, "data", &Dataset::Sft(rows))?;
    Ok(summary)
}
