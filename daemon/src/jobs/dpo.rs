//! `dpo`: DPO (sigmoid) against a frozen reference whose log-probs are
//! computed once up front and recorded as an output, plus NLL on the chosen
//! response; format tokens masked out of the DPO term (Llama 3 §4.1.4).
//! Chosen is the best-ranked response, rejected the worst.

use anyhow::{bail, Context, Result};
use herd_engine::objective::{self, Pair};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::inputs::{chat_of, load_rows, prompt_completions, truncate};
use super::recipe::{Accepts, Bound, InputNames, JobContext, OutputKind, Recipe, Validate};
use super::training::{save_trained, train_loop, OwnParams, TrainParams, Trained};
use crate::data::{PreferenceExample, Strength};
use herd_core::{ArtifactKind, JobKind};

/// What `dpo` adds to the shared training hyperparameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Own {
    pub beta: f64,
    pub nll_weight: f64,
    pub mask_format_tokens: bool,
    /// Pairs marked weaker than this are dropped (rows without a strength
    /// are kept). Default: `better`, i.e. significantly better and better
    /// only, as Llama 3 trains DPO.
    pub min_strength: Strength,
}

pub type Params = Trained<Own>;

impl Default for Own {
    fn default() -> Self {
        Own {
            beta: 0.1,
            nll_weight: 0.2,
            mask_format_tokens: true,
            min_strength: Strength::Better,
        }
    }
}

impl OwnParams for Own {
    fn train_defaults() -> TrainParams {
        TrainParams {
            batch_size: 2,
            ..TrainParams::default()
        }
    }
}

impl Validate for Own {
    fn validate(&self) -> Result<(), String> {
        if !(self.beta.is_finite() && self.beta > 0.0)
            || !(self.nll_weight.is_finite() && self.nll_weight >= 0.0)
        {
            return Err("beta must be > 0 and nll_weight >= 0".into());
        }
        Ok(())
    }
    fn bounds() -> Vec<Bound> {
        vec![
            Bound::at_least("beta", 0.0, false),
            Bound::at_least("nll_weight", 0.0, true),
        ]
    }
}

/// The `dpo` recipe.
pub struct Dpo;

impl Recipe for Dpo {
    type Params = Params;
    const KIND: JobKind = JobKind::Dpo;
    const INPUTS: InputNames = InputNames::Named {
        required: &["model", "data"],
        optional: &["reference", "adapter"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[
        ("checkpoint", OutputKind::Is(ArtifactKind::Checkpoint)),
        ("adapter", OutputKind::Is(ArtifactKind::Adapter)),
        ("reference_logps", OutputKind::Is(ArtifactKind::Cache)),
    ];
    const ACCEPTS: Accepts = super::training::ON_PREFERENCES;
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let model_dir = ctx.input("model")?.to_path_buf();
    let ref_dir = ctx
        .inputs
        .get("reference")
        .cloned()
        .unwrap_or_else(|| model_dir.clone());
    let chat = chat_of(&model_dir)?;
    let rows: Vec<PreferenceExample> = load_rows(ctx.input("data")?)?;
    let mut pairs = vec![];
    let (mut dropped, mut too_weak) = (0, 0);
    for r in &rows {
        if r.weaker_than(p.own.min_strength) {
            too_weak += 1;
            continue;
        }
        let worst = r.responses.last().expect("2+ responses");
        let [chosen, rejected]: [_; 2] =
            prompt_completions(&chat, &r.prompt, &[&r.responses[0], worst])?
                .try_into()
                .expect("two completions");
        let chosen = truncate(chosen, p.train.max_seq_len);
        let rejected = truncate(rejected, p.train.max_seq_len);
        match (chosen, rejected) {
            (Some(chosen), Some(rejected))
                if objective::shared_prompt_len(&chosen, &rejected) > 0 =>
            {
                pairs.push(Pair { chosen, rejected })
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 || too_weak > 0 {
        ctx.sink.note(&format!(
            "dpo data: {} pairs kept, {too_weak} dropped as weaker than {}, {dropped} truncated away by max_seq_len {}",
            pairs.len(),
            p.own.min_strength.as_str(),
            p.train.max_seq_len
        ));
    }
    if pairs.is_empty() {
        bail!(
            "no preference pairs left to train on ({} rows: {too_weak} weaker than min_strength {}, {dropped} too long)",
            rows.len(),
            p.own.min_strength.as_str()
        );
    }
    let pad = chat.special.pad;
    // Reference log-probs: once, in fixed chunks, recorded with the job.
    // With LoRA the reference is the base, i.e. the policy with its adapter
    // switched off: no second model in memory.
    let (mut ref_c, mut ref_r) = (vec![], vec![]);
    let reference_logps = |reference: &herd_engine::Llama,
                           ref_c: &mut Vec<f32>,
                           ref_r: &mut Vec<f32>|
     -> Result<()> {
        for chunk in pairs.chunks(p.train.batch_size.max(1)) {
            let (c, r) =
                objective::reference_logps(reference, chunk, p.own.mask_format_tokens, true, pad)?;
            ref_c.extend(c);
            ref_r.extend(r);
        }
        Ok(())
    };
    let model = if p.lora.active(ctx) {
        if ref_dir != model_dir {
            bail!("with LoRA the reference is the base model with the adapter switched off: leave out input `reference` (or give the `model` itself)");
        }
        let mut model = herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?;
        p.prepare(ctx, &mut model)?;
        let lora = model.lora.as_ref().expect("attached");
        lora.set_enabled(false);
        reference_logps(&model, &mut ref_c, &mut ref_r).context("reference log-probs")?;
        lora.set_enabled(true);
        model
    } else {
        {
            let mut reference = herd_engine::checkpoint::load_model(&ref_dir, &ctx.device)?;
            if p.train.dtype == super::training::Precision::Bf16 {
                reference.freeze_base(true);
                super::training::bf16(&mut reference)?;
            }
            reference_logps(&reference, &mut ref_c, &mut ref_r)?;
        }
        let mut model = herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?;
        p.prepare(ctx, &mut model)?;
        model
    };
    let cache_path = ctx.workdir.join("reference_logps.json");
    std::fs::write(
        &cache_path,
        serde_json::to_vec(
            &json!({"chosen": ref_c, "rejected": ref_r, "mask_format_tokens": p.own.mask_format_tokens}),
        )?,
    )?;
    ctx.sink.output(
        "reference_logps",
        herd_core::ArtifactKind::Cache,
        &cache_path,
        json!({"pairs": pairs.len()}),
    )?;

    let n = pairs.len();
    let last = train_loop(ctx, &model, &p.train, n, |idx, extras| {
        let batch: Vec<Pair> = idx.iter().map(|i| pairs[*i].clone()).collect();
        let rc: Vec<f32> = idx.iter().map(|i| ref_c[*i]).collect();
        let rr: Vec<f32> = idx.iter().map(|i| ref_r[*i]).collect();
        let out = objective::dpo_loss(
            &model,
            &batch,
            &rc,
            &rr,
            p.own.beta,
            p.own.nll_weight,
            p.own.mask_format_tokens,
            pad,
        )?;
        let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
        extras.push(("dpo_loss".into(), out.dpo_loss));
        extras.push(("nll".into(), out.nll));
        extras.push(("chosen_reward".into(), mean(&out.chosen_rewards)));
        extras.push(("rejected_reward".into(), mean(&out.rejected_rewards)));
        extras.push(("reward_margin".into(), out.reward_margin()));
        extras.push(("reward_accuracy".into(), out.reward_accuracy()));
        let tokens = batch
            .iter()
            .map(|b| b.chosen.len() + b.rejected.len())
            .sum();
        Ok((out.loss, tokens))
    })?;
    let summary = json!({"pairs": n, "dropped_truncated": dropped, "final": last.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()});
    save_trained(ctx, &model, &model_dir, summary.clone())?;
    Ok(summary)
}
