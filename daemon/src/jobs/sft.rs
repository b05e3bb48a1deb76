//! `sft`: cross entropy on what the assistant writes, prompt tokens masked,
//! averaged over the batch's target tokens; optional packing of several
//! examples per row (block-diagonal attention).

use anyhow::Result;
use herd_engine::objective;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::inputs::{chat_of, load_rows, truncate};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use super::training::{save_trained, train_loop, OwnParams, Trained};
use crate::data::SftExample;
use herd_core::JobKind;

/// What `sft` adds to the shared training hyperparameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Own {
    /// Pack several examples per row up to max_seq_len.
    pub packing: bool,
    /// In a multi-turn dialog, train only the last assistant turn (by
    /// default every assistant turn is trained, as TRL's assistant_only_loss).
    pub last_turn_only: bool,
}

pub type Params = Trained<Own>;

impl OwnParams for Own {}

impl Validate for Own {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The `sft` recipe.
pub struct Sft;

impl Recipe for Sft {
    type Params = Params;
    const KIND: JobKind = JobKind::Sft;
    const INPUTS: InputNames = super::training::MODEL_AND_DATA;
    const OUTPUTS: &'static [(&'static str, OutputKind)] = super::training::TRAINED;
    const ACCEPTS: Accepts = super::training::ON_DIALOGS;
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let model_dir = ctx.input("model")?.to_path_buf();
    let chat = chat_of(&model_dir)?;
    let rows: Vec<SftExample> = load_rows(ctx.input("data")?)?;
    let mut seqs = vec![];
    let mut dropped = 0;
    // Tokens before the first trained one, of the shortest dropped row.
    let mut shortest_prompt = usize::MAX;
    for r in &rows {
        let encoded = super::inputs::encode_sft(&chat, r, p.own.last_turn_only)?;
        let prompt = encoded
            .target_mask
            .iter()
            .position(|t| *t != 0)
            .unwrap_or(encoded.len());
        match truncate(encoded, p.train.max_seq_len) {
            Some(e) => seqs.push(e),
            None => {
                dropped += 1;
                shortest_prompt = shortest_prompt.min(prompt);
            }
        }
    }
    if seqs.is_empty() {
        anyhow::bail!(
            "no SFT examples left to train on ({} rows: {dropped} whose completion max_seq_len {} truncated away, the shortest of their prompts being {} tokens; raise max_seq_len)",
            rows.len(),
            p.train.max_seq_len,
            shortest_prompt
        );
    }
    if dropped > 0 {
        ctx.sink.note(&format!(
            "dropped {dropped} example(s) whose completion was truncated away by max_seq_len {}",
            p.train.max_seq_len
        ));
    }
    let mut model = herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?;
    p.prepare(ctx, &mut model)?;
    let pad = chat.special.pad;
    let n = seqs.len();
    let last = train_loop(ctx, &model, &p.train, n, |idx, _| {
        let batch: Vec<_> = idx.iter().map(|i| seqs[*i].clone()).collect();
        let (loss, tokens) = if p.own.packing {
            objective::sft_loss_packed(&model, &batch, pad, p.train.max_seq_len)?
        } else {
            objective::sft_loss(&model, &batch, pad)?
        };
        Ok((loss, tokens))
    })?;
    let summary = json!({"examples": n, "dropped_truncated": dropped, "final": last.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()});
    save_trained(ctx, &model, &model_dir, summary.clone())?;
    Ok(summary)
}
