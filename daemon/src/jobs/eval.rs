//! `eval`: what a round is judged by. Task accuracy on prompts with
//! checkable answers (greedy), win rate of the policy over a baseline judged
//! by a reward model, RM pairwise accuracy on preference data, held-out SFT
//! loss. Each metric is computed when its inputs are given.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::{complete, score, GenParams};
use super::inputs::{chat_of, load_rows};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{PreferenceExample, PromptExample, SftExample};
use herd_core::{ArtifactKind, JobKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub max_seq_len: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_new_tokens: 64,
            batch_size: 16,
            max_seq_len: 512,
        }
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        use super::training::{in_range, limits::*};
        in_range("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)?;
        in_range("batch_size", self.batch_size, 1, MAX_BATCH)?;
        in_range("max_seq_len", self.max_seq_len, 2, MAX_SEQ_LEN)?;
        Ok(())
    }
    fn bounds() -> Vec<super::recipe::Bound> {
        use super::{recipe::Bound, training::limits::*};
        vec![
            Bound::closed("max_new_tokens", 1.0, MAX_NEW_TOKENS as f64),
            Bound::closed("batch_size", 1.0, MAX_BATCH as f64),
            Bound::closed("max_seq_len", 2.0, MAX_SEQ_LEN as f64),
        ]
    }
}

/// The `eval` recipe.
pub struct Eval;

impl Recipe for Eval {
    type Params = Params;
    const KIND: JobKind = JobKind::Eval;
    const INPUTS: InputNames = InputNames::Named {
        required: &["policy"],
        optional: &["baseline", "rm", "prompts", "sft", "preference"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[];
    const ACCEPTS: Accepts = &[
        ("prompts", &[ArtifactKind::Prompts]),
        ("sft", &[ArtifactKind::Sft]),
        ("preference", &[ArtifactKind::Preference]),
    ];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let g = GenParams {
        temperature: 0.0,
        top_p: 1.0,
        max_new_tokens: p.max_new_tokens,
        batch_size: p.batch_size,
    };
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let chat = chat_of(&policy_dir)?;
    let policy = herd_engine::checkpoint::load_model(&policy_dir, &ctx.device)?;
    let baseline = match ctx.inputs.get("baseline") {
        Some(d) => Some(herd_engine::checkpoint::load_model(d, &ctx.device)?),
        None => None,
    };
    let rm = match ctx.inputs.get("rm") {
        Some(d) => Some((
            herd_engine::checkpoint::load_model(d, &ctx.device)?,
            chat_of(d)?,
        )),
        None => None,
    };
    let mut m = serde_json::Map::new();
    if let Some(path) = ctx.inputs.get("prompts").cloned() {
        let prompts: Vec<PromptExample> = load_rows(&path)?;
        let msgs: Vec<_> = prompts.iter().map(|x| x.messages(0)).collect();
        let ours = complete(&policy, &chat, &msgs, 1, &g, ctx.seed, |_, _| {})?;
        let accuracy = |outs: &[Vec<String>]| {
            let checkable: Vec<(usize, &String)> = prompts
                .iter()
                .enumerate()
                .filter_map(|(i, x)| x.answer.as_ref().map(|a| (i, a)))
                .collect();
            (!checkable.is_empty()).then(|| {
                checkable
                    .iter()
                    .filter(|(i, a)| crate::task::is_correct(&outs[*i][0], a))
                    .count() as f64
                    / checkable.len() as f64
            })
        };
        if let Some(a) = accuracy(&ours) {
            m.insert("task_accuracy".into(), a.into());
        }
        if let Some(base) = &baseline {
            let theirs = complete(base, &chat, &msgs, 1, &g, ctx.seed, |_, _| {})?;
            if let Some(a) = accuracy(&theirs) {
                m.insert("baseline_task_accuracy".into(), a.into());
            }
            // The checker as judge (the annotators' rule): which answer is
            // right, or closer; a tie counts half.
            let judged: Vec<f64> = prompts
                .iter()
                .enumerate()
                .filter_map(|(i, x)| {
                    let answer = x.answer.as_ref()?;
                    Some(
                        match super::annotate::rank(&ours[i][0], &theirs[i][0], answer) {
                            Some((0, _)) => 1.0,
                            Some(_) => 0.0,
                            None => 0.5,
                        },
                    )
                })
                .collect();
            if !judged.is_empty() {
                m.insert(
                    "checker_win_rate".into(),
                    (judged.iter().sum::<f64>() / judged.len() as f64).into(),
                );
            }
            if let Some((rm, rm_chat)) = &rm {
                let mut wins = 0.0;
                for (i, messages) in msgs.iter().enumerate() {
                    let s = score(
                        rm,
                        rm_chat,
                        messages,
                        &[ours[i][0].clone(), theirs[i][0].clone()],
                    )?;
                    wins += if s[0] > s[1] {
                        1.0
                    } else if s[0] == s[1] {
                        0.5
                    } else {
                        0.0
                    };
                }
                m.insert(
                    "win_rate".into(),
                    (wins / prompts.len().max(1) as f64).into(),
                );
            }
        }
        let examples: Vec<Value> = prompts.iter().zip(&ours).take(3).map(|(x, o)| json!({"prompt": x.prompt.last().map(|m| m.content.clone()), "response": o[0], "answer": x.answer})).collect();
        m.insert("examples".into(), examples.into());
    }
    if let (Some(path), Some((rm, rm_chat))) = (ctx.inputs.get("preference").cloned(), &rm) {
        let rows: Vec<PreferenceExample> = load_rows(&path)?;
        let (mut correct, mut pairs) = (0, 0);
        for r in &rows {
            let s = score(rm, rm_chat, &r.prompt, &r.responses)?;
            for i in 0..s.len() {
                for j in i + 1..s.len() {
                    pairs += 1;
                    correct += (s[i] > s[j]) as usize;
                }
            }
        }
        m.insert(
            "rm_accuracy".into(),
            (correct as f64 / pairs.max(1) as f64).into(),
        );
    }
    if let Some(path) = ctx.inputs.get("sft").cloned() {
        let rows: Vec<SftExample> = load_rows(&path)?;
        let seqs: Vec<_> = rows
            .iter()
            .filter_map(|r| {
                super::inputs::encode_sft(&chat, r, false)
                    .ok()
                    .and_then(|e| super::inputs::truncate(e, p.max_seq_len))
            })
            .collect();
        let (mut total, mut tokens) = (0.0, 0usize);
        for chunk in seqs.chunks(p.batch_size) {
            let (loss, n) = herd_engine::objective::sft_loss(&policy, chunk, chat.special.pad)?;
            total += loss.to_scalar::<f32>()? as f64 * n as f64;
            tokens += n;
        }
        m.insert("sft_loss".into(), (total / tokens.max(1) as f64).into());
    }
    let points: Vec<(String, f64)> = m
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
        .collect();
    if points.is_empty() {
        bail!("eval computed nothing: give `prompts` (with answers), `baseline` + `rm`, `preference` + `rm`, or `sft`");
    }
    ctx.sink.metrics(0, &points)?;
    Ok(Value::Object(m))
}
