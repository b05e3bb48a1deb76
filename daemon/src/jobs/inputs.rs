//! Reading a job's inputs and writing its dataset outputs: datasets of a
//! required kind, the chat format of a checkpoint, sequence truncation.

use std::path::Path;

use anyhow::{Context, Result};
use herd_engine::chat::{ChatFormat, Encoded};

use super::recipe::JobContext;
use crate::data::{self, Dataset, DatasetKind, Row};

/// Load a dataset input, insisting on its kind.
pub fn load_dataset(path: &Path, want: DatasetKind) -> Result<Dataset> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let ds = data::parse_bytes(want, &bytes, &path.display().to_string())?;
    Ok(ds)
}

/// A dataset input's rows, of the kind the job needs (`R`).
pub fn load_rows<R: Row>(path: &Path) -> Result<Vec<R>> {
    let ds = load_dataset(path, R::KIND)?;
    Ok(R::rows_of(ds).expect("parse_bytes returns the kind it was asked for"))
}

/// The date a template's `strftime_now` prints in every job: Llama 3.1's
/// own default `date_string`, so a job's tokens never depend on the day it
/// runs (a reproduction months later tokenizes the same).
pub const TEMPLATE_DATE: (i32, u32, u32) = (2024, 7, 26);

/// A checkpoint's chat format as jobs use it (`TEMPLATE_DATE` fixed).
pub fn chat_of(model_dir: &Path) -> Result<ChatFormat> {
    Ok(ChatFormat::load(model_dir, Some(TEMPLATE_DATE))?)
}

/// An SFT row as tokens: a dialog in the chat format (every assistant turn
/// trained, or the last alone), or plain text (every token trained).
pub fn encode_sft(
    chat: &ChatFormat,
    row: &crate::data::SftExample,
    last_turn_only: bool,
) -> Result<Encoded> {
    Ok(match &row.text {
        Some(t) => chat.encode_text(t)?,
        None => chat.encode_dialog_turns(&row.messages, last_turn_only)?,
    })
}

/// Cut a sequence to `max` tokens. None when no target token survives (the
/// row would teach nothing; callers count and report such drops).
pub fn truncate(mut e: Encoded, max: usize) -> Option<Encoded> {
    if e.len() > max {
        e.ids.truncate(max);
        e.target_mask.truncate(max);
        e.format_mask.truncate(max);
    }
    e.target_mask.iter().skip(1).any(|m| *m == 1).then_some(e)
}

/// Write a dataset into the workdir and record it as an output.
pub fn save_dataset(ctx: &mut JobContext, name: &str, ds: &Dataset) -> Result<String> {
    let path = ctx.workdir.join(format!("{name}.jsonl"));
    std::fs::write(&path, ds.to_jsonl())?;
    ctx.sink
        .output(name, ds.kind().artifact(), &path, ds.summary())
}

/// Word-set Jaccard similarity of two texts (for the too-similar filters).
pub fn similarity(a: &str, b: &str) -> f64 {
    let wa: std::collections::BTreeSet<&str> = a.split_whitespace().collect();
    let wb: std::collections::BTreeSet<&str> = b.split_whitespace().collect();
    if wa.is_empty() && wb.is_empty() {
        return 1.0;
    }
    wa.intersection(&wb).count() as f64 / wa.union(&wb).count() as f64
}

/// Prompt + each completion as whole sequences; the prompt's tokens are the
/// same in every one (`ChatFormat::encode_exchange`).
pub fn prompt_completions(
    chat: &ChatFormat,
    prompt: &[herd_engine::chat::Message],
    completions: &[&str],
) -> Result<Vec<Encoded>> {
    let (p, sides) = chat.encode_exchange(prompt, completions)?;
    Ok(sides
        .iter()
        .map(|c| {
            let mut e = p.clone();
            e.extend(c);
            e
        })
        .collect())
}
