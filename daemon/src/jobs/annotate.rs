//! `annotate`: simulated annotators for tasks with checkable answers (the
//! execution-feedback loop of Llama 3). Two responses per prompt (from the
//! policy and `other`, or two samples of the policy) are ranked by the
//! checker; the strength level follows from the gap; where the better one is
//! still wrong, an edited (corrected) response is ranked above both, giving
//! 2-3 ranked responses per example.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::{complete, GenParams};
use super::inputs::{chat_of, load_rows, save_dataset};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{Dataset, PreferenceExample, PromptExample, Strength};
use crate::task;
use herd_core::{ArtifactKind, JobKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    #[serde(flatten)]
    pub gen: GenParams,
    /// Add the corrected answer above a wrong best response.
    pub edit: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            gen: GenParams {
                temperature: 1.0,
                top_p: 1.0,
                ..GenParams::default()
            },
            edit: true,
        }
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        self.gen.validate()
    }
    fn bounds() -> Vec<super::recipe::Bound> {
        GenParams::bounds()
    }
}

/// Rank two responses to a checkable prompt: (better, worse, strength), or
/// None when the checker cannot tell them apart.
pub fn rank(a: &str, b: &str, answer: &str) -> Option<(usize, Strength)> {
    let (ca, cb) = (task::is_correct(a, answer), task::is_correct(b, answer));
    if ca != cb {
        return Some((if ca { 0 } else { 1 }, Strength::SignificantlyBetter));
    }
    if ca && cb {
        // Both right: the more concise one, marginally.
        return match a.len().cmp(&b.len()) {
            std::cmp::Ordering::Less => Some((0, Strength::MarginallyBetter)),
            std::cmp::Ordering::Greater => Some((1, Strength::MarginallyBetter)),
            std::cmp::Ordering::Equal => None,
        };
    }
    match (task::distance(a, answer), task::distance(b, answer)) {
        (Some(_), None) => Some((0, Strength::Better)),
        (None, Some(_)) => Some((1, Strength::Better)),
        (Some(x), Some(y)) if x != y => {
            let (best, lo, hi) = if x < y { (0, x, y) } else { (1, y, x) };
            let ratio = lo as f64 / hi as f64;
            let s = if ratio < 0.25 {
                Strength::Better
            } else if ratio < 0.75 {
                Strength::SlightlyBetter
            } else {
                Strength::MarginallyBetter
            };
            Some((best, s))
        }
        _ => None,
    }
}

/// The `annotate` recipe.
pub struct Annotate;

impl Recipe for Annotate {
    type Params = Params;
    const KIND: JobKind = JobKind::Annotate;
    const INPUTS: InputNames = InputNames::Named {
        required: &["policy", "prompts"],
        optional: &["other"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] =
        &[("data", OutputKind::Is(ArtifactKind::Preference))];
    const COLLECTS_PREFERENCES: Option<&'static str> = Some("data");
    const ACCEPTS: Accepts = &[("prompts", &[ArtifactKind::Prompts])];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let chat = chat_of(&policy_dir)?;
    let prompts: Vec<PromptExample> = load_rows(ctx.input("prompts")?)?;
    if prompts.iter().any(|x| x.answer.is_none()) {
        bail!("annotate needs an `answer` on every prompt (the checker ranks by it)");
    }
    let msgs: Vec<_> = prompts.iter().map(|x| x.messages(0)).collect();
    let policy = herd_engine::checkpoint::load_model(&policy_dir, &ctx.device)?;
    let pairs: Vec<(String, String)> = match ctx.inputs.get("other").cloned() {
        Some(other_dir) => {
            let a = complete(&policy, &chat, &msgs, 1, &p.gen, ctx.seed, |_, _| {})?;
            let other = herd_engine::checkpoint::load_model(&other_dir, &ctx.device)?;
            let b = complete(&other, &chat, &msgs, 1, &p.gen, ctx.seed ^ 0xb, |_, _| {})?;
            a.into_iter()
                .zip(b)
                .map(|(x, y)| (x[0].clone(), y[0].clone()))
                .collect()
        }
        None => {
            let sink = &mut *ctx.sink;
            complete(&policy, &chat, &msgs, 2, &p.gen, ctx.seed, |d, t| {
                sink.progress(d as u64, t as u64)
            })?
            .into_iter()
            .map(|x| (x[0].clone(), x[1].clone()))
            .collect()
        }
    };
    let (mut rows, mut ties, mut edited, mut correct) = (vec![], 0, 0, 0);
    for (x, (a, b)) in prompts.iter().zip(&pairs) {
        let answer = x.answer.as_deref().expect("checked above");
        correct += task::is_correct(a, answer) as usize;
        let Some((best, strength)) = rank(a, b, answer) else {
            ties += 1;
            continue;
        };
        let (better, worse) = if best == 0 { (a, b) } else { (b, a) };
        if better.is_empty() || worse.is_empty() {
            ties += 1;
            continue;
        }
        let mut responses = vec![better.clone(), worse.clone()];
        if p.edit && !task::is_correct(better, answer) {
            responses.insert(0, task::corrected(answer));
            edited += 1;
        }
        rows.push(PreferenceExample {
            prompt: x.messages(0),
            responses,
            strength: Some(strength),
        });
    }
    let accuracy = correct as f64 / prompts.len().max(1) as f64;
    ctx.sink.metrics(
        0,
        &[
            ("policy_accuracy".into(), accuracy),
            ("pairs".into(), rows.len() as f64),
            ("ties".into(), ties as f64),
            ("edited".into(), edited as f64),
        ],
    )?;
    if rows.is_empty() {
        bail!(
            "the checker could not rank any of the {} response pairs",
            prompts.len()
        );
    }
    let ds = Dataset::Preference(rows);
    save_dataset(ctx, "data", &ds)?;
    Ok(
        json!({"prompts": prompts.len(), "pairs": ds.len(), "ties": ties, "edited": edited, "policy_accuracy": accuracy, "data": ds.summary()}),
    )
}
