//! `generate`: a model's answers to prompts, as an SFT dataset (each row the
//! prompt and one completion). What a user runs to see what a checkpoint
//! says, to hand completions to outside annotators, or to check a model
//! after export; no reward model involved (that is `sample`).
//!
//! Temperature 0 (the default) is greedy; `k` completions per prompt share
//! the prompt's prefill (with temperature 0 they are the same: the job says so); generation stops at the model's own stop tokens
//! (`generation_config.json`'s `eos_token_id`, the tokenizer's EOS).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::{complete_counts, GenParams};
use super::inputs::{chat_of, load_rows, save_dataset};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{Dataset, PromptExample, SftExample};
use herd_core::{ArtifactKind, JobKind};
use herd_engine::chat::Message;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// Completions per prompt.
    pub k: usize,
    #[serde(flatten)]
    pub gen: GenParams,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            k: 1,
            gen: GenParams {
                temperature: 0.0,
                ..GenParams::default()
            },
        }
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        super::generation::check_k(self.k, 1)?;
        self.gen.validate()
    }
    fn bounds() -> Vec<super::recipe::Bound> {
        let mut b = GenParams::bounds();
        b.push(super::generation::k_bound(1));
        b
    }
}

/// The `generate` recipe.
pub struct Generate;

impl Recipe for Generate {
    type Params = Params;
    const KIND: JobKind = JobKind::Generate;
    const INPUTS: InputNames = InputNames::Named {
        required: &["model", "prompts"],
        optional: &["adapter"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] =
        &[("data", OutputKind::Is(ArtifactKind::Sft))];
    const ACCEPTS: Accepts = &[
        ("prompts", &[ArtifactKind::Prompts]),
        ("adapter", &[ArtifactKind::Adapter]),
    ];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let model_dir = ctx.input("model")?.to_path_buf();
    let prompts: Vec<PromptExample> = load_rows(ctx.input("prompts")?)?;
    let chat = chat_of(&model_dir)?;
    if p.k > 1 && p.gen.temperature == 0.0 {
        ctx.sink.note(&format!(
            "temperature 0 is greedy: the {} completions of each prompt are the same (set temperature > 0 to sample)",
            p.k
        ));
    }
    let mut model = herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?;
    if model.score.is_some() {
        bail!(
            "input `model` is a reward model (it scores, it does not generate); give a causal LM"
        );
    }
    if let Some(adapter) = ctx.inputs.get("adapter").cloned() {
        herd_engine::checkpoint::load_adapter(&mut model, &adapter)?;
    }
    // A prompt with several system prompts: its k completions cycle through them.
    let variants: Vec<Vec<(Vec<Message>, usize)>> = prompts
        .iter()
        .map(|x| {
            let v = x.system.len().max(1).min(p.k);
            (0..v)
                .map(|i| (x.messages(i), p.k / v + usize::from(i < p.k % v)))
                .collect()
        })
        .collect();
    let flat: Vec<(&[Message], usize)> = variants
        .iter()
        .flatten()
        .map(|(m, n)| (m.as_slice(), *n))
        .collect();
    let generated = {
        let sink = &mut *ctx.sink;
        complete_counts(&model, &chat, &flat, &p.gen, ctx.seed, |d, t| {
            sink.progress(d as u64, t as u64)
        })?
    };
    let mut rows = vec![];
    let (mut empty, mut chars) = (0usize, 0usize);
    for ((messages, _), texts) in variants.iter().flatten().zip(generated) {
        for text in texts {
            empty += usize::from(text.is_empty());
            chars += text.chars().count();
            let mut m = messages.clone();
            m.push(Message::new("assistant", &text));
            rows.push(SftExample::dialog(m));
        }
    }
    let n = rows.len();
    ctx.sink.metrics(
        0,
        &[
            ("completions".into(), n as f64),
            ("mean_chars".into(), chars as f64 / n.max(1) as f64),
            ("empty".into(), empty as f64),
        ],
    )?;
    save_dataset(ctx, "data", &Dataset::Sft(rows))?;
    Ok(json!({
        "prompts": prompts.len(), "completions": n, "empty": empty,
        "mean_chars": chars as f64 / n.max(1) as f64,
        "stop_tokens": chat.stop_ids(),
    }))
}
