//! `sft`: cross entropy on what the assistant writes, prompt tokens masked,
//! averaged over the batch's target tokens; optional packing of several
//! examples per row (block-diagonal attention).

use anyhow::Result;
use herd_engine::objective;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{chat_of, load_dataset, save_checkpoint, train_loop, truncate, TrainParams};
use super::{JobContext, Validate};
use crate::data::{Dataset, DatasetKind};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    #[serde(flatten)]
    pub train: TrainParams,
    /// Pack several examples per row up to max_seq_len.
    pub packing: bool,
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        self.train.validate()
    }
}

pub fn run(ctx: &mut JobContext) -> Result<Value> {
    let p: Params = ctx.params()?;
    let model_dir = ctx.input("model")?.to_path_buf();
    let chat = chat_of(&model_dir)?;
    let Dataset::Sft(rows) = load_dataset(ctx.input("data")?, DatasetKind::Sft)? else {
        unreachable!()
    };
    let mut seqs = vec![];
    let mut dropped = 0;
    for r in &rows {
        match truncate(chat.encode_dialog(&r.messages)?, p.train.max_seq_len) {
            Some(e) => seqs.push(e),
            None => dropped += 1,
        }
    }
    if dropped > 0 {
        ctx.sink.note(&format!(
            "dropped {dropped} example(s) whose completion was truncated away by max_seq_len {}",
            p.train.max_seq_len
        ));
    }
    let model = herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?;
    let pad = chat.special.pad;
    let n = seqs.len();
    let last = train_loop(ctx, model.params(), &p.train, n, |idx, _| {
        let batch: Vec<_> = idx.iter().map(|i| seqs[*i].clone()).collect();
        let (loss, tokens) = if p.packing {
            objective::sft_loss_packed(&model, &batch, pad, p.train.max_seq_len)?
        } else {
            objective::sft_loss(&model, &batch, pad)?
        };
        Ok((loss, tokens))
    })?;
    let summary = json!({"examples": n, "dropped_truncated": dropped, "final": last.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()});
    save_checkpoint(ctx, &model, &model_dir, summary.clone())?;
    Ok(summary)
}
