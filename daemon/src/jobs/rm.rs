//! `rm`: a reward model from a base checkpoint (score head added), trained
//! with Bradley-Terry over every ordered pair of 2-3 ranked responses, no
//! margin by default (Llama 3), optionally Llama 2's margin by strength.
//! Rows are packed: prompt once, responses shuffled after it, each seeing
//! only the prompt and itself. Examples whose responses are too similar to
//! tell apart are filtered first; a held-out split measures accuracy.

use anyhow::{bail, Result};
use herd_engine::objective::{self, Ranked};
use herd_engine::rng::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::inputs::{chat_of, load_rows, similarity};
use super::recipe::{Accepts, Bound, InputNames, JobContext, OutputKind, Recipe, Validate};
use super::training::{save_trained, train_loop, OwnParams, Trained};
use crate::data::{PreferenceExample, Strength};
use herd_core::JobKind;

/// What `rm` adds to the shared training hyperparameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Own {
    /// Add Llama 2's margin by preference strength.
    pub margin: bool,
    /// Pairs marked weaker than this are dropped (rows without a strength
    /// are kept). Default: all but `marginally_better`, Llama 2/3's
    /// "negligibly better / unsure".
    pub min_strength: Strength,
    /// Drop examples with two responses at least this similar (word Jaccard).
    pub similarity_threshold: f64,
    /// Share of examples held out for evaluation.
    pub heldout_fraction: f64,
}

pub type Params = Trained<Own>;

impl Default for Own {
    fn default() -> Self {
        Own {
            margin: false,
            min_strength: Strength::SlightlyBetter,
            similarity_threshold: 0.95,
            heldout_fraction: 0.1,
        }
    }
}

impl OwnParams for Own {}

impl Validate for Own {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.similarity_threshold)
            || !(0.0..0.9).contains(&self.heldout_fraction)
        {
            return Err("similarity_threshold in [0, 1], heldout_fraction in [0, 0.9)".into());
        }
        Ok(())
    }
    fn bounds() -> Vec<Bound> {
        vec![
            Bound::closed("similarity_threshold", 0.0, 1.0),
            Bound {
                name: "heldout_fraction",
                min: 0.0,
                min_inclusive: true,
                max: Some(0.9),
                max_inclusive: false,
            },
        ]
    }
}

/// The `rm` recipe.
pub struct Rm;

impl Recipe for Rm {
    type Params = Params;
    const KIND: JobKind = JobKind::Rm;
    const INPUTS: InputNames = super::training::MODEL_AND_DATA;
    const OUTPUTS: &'static [(&'static str, OutputKind)] = super::training::TRAINED;
    const ACCEPTS: Accepts = super::training::ON_PREFERENCES;
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let model_dir = ctx.input("model")?.to_path_buf();
    let chat = chat_of(&model_dir)?;
    let rows: Vec<PreferenceExample> = load_rows(ctx.input("data")?)?;
    let mut examples = vec![];
    let (mut too_similar, mut too_long, mut too_weak) = (0, 0, 0);
    for r in &rows {
        if r.weaker_than(p.own.min_strength) {
            too_weak += 1;
            continue;
        }
        let similar = (0..r.responses.len()).any(|i| {
            (i + 1..r.responses.len())
                .any(|j| similarity(&r.responses[i], &r.responses[j]) >= p.own.similarity_threshold)
        });
        if similar {
            too_similar += 1;
            continue;
        }
        let texts: Vec<&str> = r.responses.iter().map(String::as_str).collect();
        let (prompt, responses) = chat.encode_exchange(&r.prompt, &texts)?;
        let prompt = prompt.ids;
        let responses: Vec<Vec<u32>> = responses.into_iter().map(|x| x.ids).collect();
        if prompt.len() + responses.iter().map(|x| x.len()).sum::<usize>() > p.train.max_seq_len {
            too_long += 1;
            continue;
        }
        let margin = if p.own.margin {
            r.strength.map(|s| s.margin()).unwrap_or(0.0)
        } else {
            0.0
        };
        examples.push(Ranked {
            prompt,
            responses,
            margin,
        });
    }
    ctx.sink.note(&format!(
        "rm data: {} examples kept, {too_weak} dropped as weaker than {}, {too_similar} as too similar (>= {}), {too_long} longer than max_seq_len",
        examples.len(),
        p.own.min_strength.as_str(),
        p.own.similarity_threshold
    ));
    // Held-out split: a seeded shuffle, the tail held out.
    let mut rng = Rng::new(ctx.seed ^ 0x5eed);
    rng.shuffle(&mut examples);
    let held = if examples.len() >= 10 {
        (examples.len() as f64 * p.own.heldout_fraction).round() as usize
    } else {
        0
    };
    let heldout: Vec<Ranked> = examples.split_off(examples.len() - held);
    if examples.is_empty() {
        bail!(
            "no reward-model examples left to train on ({} rows: {too_weak} weaker than min_strength {}, {too_similar} too similar, {too_long} too long)",
            rows.len(),
            p.own.min_strength.as_str()
        );
    }
    let mut model =
        herd_engine::checkpoint::load_as_reward_model(&model_dir, &ctx.device, ctx.seed)?;
    p.prepare(ctx, &mut model)?;
    let pad = chat.special.pad;
    let mut order_rng = Rng::new(ctx.seed ^ 0x0dd);
    let last = train_loop(ctx, &model, &p.train, examples.len(), |idx, extras| {
        let batch: Vec<Ranked> = idx.iter().map(|i| examples[*i].clone()).collect();
        let orders: Vec<Vec<usize>> = batch
            .iter()
            .map(|e| {
                let mut o: Vec<usize> = (0..e.responses.len()).collect();
                order_rng.shuffle(&mut o);
                o
            })
            .collect();
        let (out, _) = objective::rm_loss(&model, &batch, true, Some(&orders), pad)?;
        extras.push(("accuracy".into(), out.correct as f64 / out.pairs as f64));
        let tokens = batch
            .iter()
            .map(|e| e.prompt.len() + e.responses.iter().map(|r| r.len()).sum::<usize>())
            .sum();
        Ok((out.loss, tokens))
    })?;
    let mut summary = json!({"examples": examples.len(), "heldout": heldout.len(), "dropped_similar": too_similar,
        "dropped_too_long": too_long, "final": last.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()});
    if let Some(lora) = &model.lora {
        lora.set_training(false, 0);
    }
    if !heldout.is_empty() {
        let (loss, acc) = evaluate(&model, &heldout, pad)?;
        let step = p.train.total_steps(examples.len());
        ctx.sink.metrics(
            step,
            &[
                ("heldout_loss".into(), loss),
                ("heldout_accuracy".into(), acc),
            ],
        )?;
        summary["heldout_loss"] = loss.into();
        summary["heldout_accuracy"] = acc.into();
    }
    save_trained(ctx, &model, &model_dir, summary.clone())?;
    Ok(summary)
}

/// Mean BT loss and pairwise accuracy over examples (no gradient).
pub fn evaluate(model: &herd_engine::Llama, examples: &[Ranked], pad: u32) -> Result<(f64, f64)> {
    let (mut loss, mut pairs, mut correct) = (0.0, 0usize, 0usize);
    for chunk in examples.chunks(8) {
        let (out, _) = objective::rm_loss(model, chunk, true, None, pad)?;
        loss += out.loss.to_scalar::<f32>()? as f64 * out.pairs as f64;
        pairs += out.pairs;
        correct += out.correct;
    }
    Ok((
        loss / pairs.max(1) as f64,
        correct as f64 / pairs.max(1) as f64,
    ))
}
