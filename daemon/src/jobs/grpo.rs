//! `grpo`: online RL with verifiable rewards. Each step draws
//! `prompts_per_step` prompts, samples a group of `group_size` completions
//! of each with the shared-prefill sampler, scores them (a built-in
//! verifier rule against the prompt's `answer` or a verifier program, a
//! reward model, or a weighted sum of both), turns rewards into group-relative advantages and
//! takes `num_iterations` optimizer steps on the clipped surrogate (the
//! math and its TRL fixtures: `herd_engine::grpo`). Every completion is
//! kept in the `rollouts` output with its rewards, advantage, group, step
//! and the sampler's log-prob, so a run can be read back and reproduced.
//!
//! Reproducible on CPU: prompts are drawn and completions sampled from
//! seeds derived from the job's seed and the step, and scoring is a pure
//! function of the text.

use anyhow::{bail, Context, Result};
use herd_engine::chat::Message;
use herd_engine::grpo::{self, Baseline, GrpoLoss, LossType, Rollout, Scale};
use herd_engine::optim::Decay;
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::score;
use super::inputs::{chat_of, load_dataset};
use super::recipe::{Accepts, Bound, InputNames, JobContext, OutputKind, Recipe, Validate};
use super::training::{in_range, limits, save_trained, LoraParams, Precision};
use crate::data::{Dataset, DatasetKind};
use crate::verifiers::Rule;
use herd_core::{ArtifactKind, JobKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    /// Generation steps; each takes `num_iterations` optimizer steps.
    pub steps: u64,
    pub prompts_per_step: usize,
    /// Completions per prompt (at least 2: advantages are within a group).
    pub group_size: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Rollouts per forward/backward pass (the step's gradient is
    /// accumulated over them).
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub dtype: Precision,
    pub activation_checkpointing: bool,
    #[serde(flatten)]
    pub lora: LoraParams,
    /// μ: optimizer steps on each batch of rollouts (importance ratios
    /// against the sampler's log-probs after the first).
    pub num_iterations: usize,
    pub epsilon: f64,
    /// DAPO's clip-higher (default: `epsilon`).
    pub epsilon_high: Option<f64>,
    /// Weight of the k3 KL to the reference (0: no reference is run).
    pub beta: f64,
    /// grpo, bnpo, dr_grpo or dapo: how token losses are normalised.
    pub loss_type: String,
    /// grpo (group mean baseline), dr_grpo (mean, never scaled) or rloo
    /// (leave-one-out mean).
    pub advantage: String,
    /// group, batch or none.
    pub scale_rewards: String,
    /// A completion cut at max_new_tokens trains nothing.
    pub mask_truncated_completions: bool,
    /// exact, number, regex or format (none: the `rm` input alone rewards).
    pub verifier_rule: Option<String>,
    pub verifier_pattern: String,
    pub verifier_tolerance: f64,
    /// `number`: partial credit exp(-|x - answer| / scale) for a wrong
    /// number (0: right or wrong only).
    pub verifier_scale: f64,
    /// A `verifier` input program's time limit for one step's completions.
    pub verifier_timeout_s: u64,
    /// A `verifier` input program's address-space limit.
    pub verifier_memory_mb: u64,
    /// [verifier, rm] weights of a summed reward (default: 1 each).
    pub reward_weights: Vec<f64>,
    /// Record every completion as the `rollouts` output.
    pub keep_rollouts: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            steps: 20,
            prompts_per_step: 4,
            group_size: 8,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 64,
            batch_size: 16,
            lr: 1e-6,
            warmup_steps: 0,
            weight_decay: 0.0,
            grad_clip: 1.0,
            decay: Decay::Constant,
            min_lr_ratio: 0.0,
            dtype: Precision::F32,
            activation_checkpointing: false,
            lora: LoraParams::default(),
            num_iterations: 1,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            loss_type: "dapo".into(),
            advantage: "grpo".into(),
            scale_rewards: "group".into(),
            mask_truncated_completions: false,
            verifier_rule: None,
            verifier_pattern: String::new(),
            verifier_tolerance: 1e-6,
            verifier_scale: 0.0,
            verifier_timeout_s: 60,
            verifier_memory_mb: 4096,
            reward_weights: vec![],
            keep_rollouts: true,
        }
    }
}

impl Params {
    fn loss_type(&self) -> Result<LossType, String> {
        match self.loss_type.as_str() {
            "grpo" => Ok(LossType::Grpo),
            "bnpo" => Ok(LossType::Bnpo),
            "dr_grpo" => Ok(LossType::DrGrpo),
            "dapo" => Ok(LossType::Dapo),
            x => Err(format!(
                "loss_type {x:?} is not one of grpo, bnpo, dr_grpo, dapo"
            )),
        }
    }
    fn baseline(&self) -> Result<(Baseline, Scale), String> {
        let scale = match self.scale_rewards.as_str() {
            "group" => Scale::Group,
            "batch" => Scale::Batch,
            "none" => Scale::None,
            x => {
                return Err(format!(
                    "scale_rewards {x:?} is not one of group, batch, none"
                ))
            }
        };
        match self.advantage.as_str() {
            "grpo" => Ok((Baseline::GroupMean, scale)),
            "dr_grpo" => Ok((Baseline::GroupMean, Scale::None)),
            "rloo" => Ok((Baseline::LeaveOneOut, scale)),
            x => Err(format!("advantage {x:?} is not one of grpo, dr_grpo, rloo")),
        }
    }
    fn rule(&self) -> Result<Option<Rule>, String> {
        self.verifier_rule
            .as_deref()
            .map(|r| {
                Rule::with_scale(
                    r,
                    &self.verifier_pattern,
                    self.verifier_tolerance,
                    self.verifier_scale,
                )
            })
            .transpose()
    }
    fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

impl Validate for Params {
    fn lora(&self) -> Option<&LoraParams> {
        Some(&self.lora)
    }
    fn validate(&self) -> Result<(), String> {
        use limits::*;
        in_range("steps", self.steps, 1, MAX_STEPS)?;
        in_range("prompts_per_step", self.prompts_per_step, 1, MAX_BATCH)?;
        in_range("group_size", self.group_size, 2, MAX_SAMPLES_PER_PROMPT)?;
        in_range("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)?;
        in_range("batch_size", self.batch_size, 1, MAX_BATCH)?;
        in_range("num_iterations", self.num_iterations, 1, 64)?;
        if !(self.temperature > 0.0 && self.temperature <= 100.0) {
            return Err(format!(
                "temperature must be in (0, 100] (a group needs different samples), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR) {
            return Err(format!("lr must be in (0, {MAX_LR}], got {}", self.lr));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("beta", self.beta),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a number >= 0, got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(format!(
                "min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        for (name, v) in [
            ("epsilon", self.epsilon),
            ("epsilon_high", self.epsilon_high()),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 10.0) {
                return Err(format!("{name} must be in (0, 10), got {v}"));
            }
        }
        if self.epsilon >= 1.0 {
            return Err(format!(
                "epsilon must be below 1 (the lower clip is 1 - epsilon), got {}",
                self.epsilon
            ));
        }
        self.loss_type()?;
        self.baseline()?;
        self.rule()?;
        if self.reward_weights.iter().any(|w| !w.is_finite()) {
            return Err("reward_weights must be finite numbers".into());
        }
        in_range("verifier_timeout_s", self.verifier_timeout_s, 1, 86_400)?;
        in_range("verifier_memory_mb", self.verifier_memory_mb, 16, 1 << 22)?;
        self.lora.validate()
    }
    fn bounds() -> Vec<Bound> {
        use limits::*;
        let mut b = vec![
            Bound::closed("steps", 1.0, MAX_STEPS as f64),
            Bound::closed("prompts_per_step", 1.0, MAX_BATCH as f64),
            Bound::closed("group_size", 2.0, MAX_SAMPLES_PER_PROMPT as f64),
            Bound::closed("max_new_tokens", 1.0, MAX_NEW_TOKENS as f64),
            Bound::closed("batch_size", 1.0, MAX_BATCH as f64),
            Bound::closed("num_iterations", 1.0, 64.0),
            Bound::above("temperature", 0.0, 100.0),
            Bound::above("top_p", 0.0, 1.0),
            Bound::above("lr", 0.0, MAX_LR),
            Bound::at_least("weight_decay", 0.0, true),
            Bound::at_least("grad_clip", 0.0, true),
            Bound::at_least("beta", 0.0, true),
            Bound::closed("min_lr_ratio", 0.0, 1.0),
            Bound {
                name: "epsilon",
                min: 0.0,
                min_inclusive: false,
                max: Some(1.0),
                max_inclusive: false,
            },
        ];
        b.extend(LoraParams::bounds());
        b.push(Bound::closed("verifier_timeout_s", 1.0, 86_400.0));
        b.push(Bound::closed(
            "verifier_memory_mb",
            16.0,
            (1u64 << 22) as f64,
        ));
        b
    }
}

/// The `grpo` recipe.
pub struct Grpo;

impl Recipe for Grpo {
    type Params = Params;
    const KIND: JobKind = JobKind::Grpo;
    const INPUTS: InputNames = InputNames::Named {
        required: &["policy", "prompts"],
        optional: &["adapter", "reference", "rm", "verifier"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[
        ("checkpoint", OutputKind::Is(ArtifactKind::Checkpoint)),
        ("adapter", OutputKind::Is(ArtifactKind::Adapter)),
        ("rollouts", OutputKind::Is(ArtifactKind::Rollouts)),
    ];
    const ACCEPTS: Accepts = &[
        ("prompts", &[ArtifactKind::Prompts]),
        ("adapter", &[ArtifactKind::Adapter]),
        ("verifier", &[ArtifactKind::Verifier]),
    ];
    fn check_with_inputs(p: &Params, inputs: &[&str]) -> Result<(), String> {
        let program = inputs.contains(&"verifier");
        if program && p.verifier_rule.is_some() {
            return Err("give verifier_rule or a `verifier` input (a program), not both".into());
        }
        let sources =
            usize::from(p.verifier_rule.is_some() || program) + usize::from(inputs.contains(&"rm"));
        if sources == 0 {
            return Err("grpo needs a reward: set verifier_rule (exact, number, regex, format), give a `verifier` input (a program) or an `rm` input".into());
        }
        if !p.reward_weights.is_empty() && p.reward_weights.len() != 2 {
            return Err(format!(
                "reward_weights is [verifier, rm], two numbers; got {}",
                p.reward_weights.len()
            ));
        }
        Ok(())
    }
    fn makes(p: &Params, inputs: &[&str], output: &str) -> bool {
        match output {
            "rollouts" => p.keep_rollouts,
            _ => p.lora.makes(inputs, output),
        }
    }
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

/// One prompt of the dataset, ready to sample from.
struct Prompt {
    messages: Vec<Message>,
    ids: Vec<u32>,
    answer: Option<String>,
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let chat = chat_of(&policy_dir)?;
    let Dataset::Prompts(rows) = load_dataset(ctx.input("prompts")?, DatasetKind::Prompts)? else {
        unreachable!()
    };
    let rule = p.rule().map_err(anyhow::Error::msg)?;
    if let Some(r) = rule.as_ref().filter(|r| r.needs_answer()) {
        if let Some(i) = rows.iter().position(|x| x.answer.is_none()) {
            bail!("input `prompts`, row {}: the {r:?} verifier compares with the prompt's `answer`, which this row lacks", i + 1);
        }
    }
    let prompts: Vec<Prompt> = rows
        .iter()
        .map(|x| {
            let messages = x.messages(0);
            let ids = chat.encode_prompt(&messages)?.ids;
            Ok(Prompt {
                messages,
                ids,
                answer: x.answer.clone(),
            })
        })
        .collect::<Result<_>>()?;
    let program = match ctx.inputs.get("verifier") {
        Some(file) => Some(
            crate::verifiers::Program::install(
                file,
                &ctx.workdir.join("verifier-run"),
                std::time::Duration::from_secs(p.verifier_timeout_s),
                p.verifier_memory_mb << 20,
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let rm = match ctx.inputs.get("rm") {
        Some(dir) => {
            let m = herd_engine::checkpoint::load_model(dir, &ctx.device)?;
            if m.score.is_none() {
                bail!("input `rm` is not a reward model (its config is not LlamaForSequenceClassification)");
            }
            Some((m, chat_of(dir)?))
        }
        None => None,
    };
    let weights = match p.reward_weights.as_slice() {
        [v, r] => (*v as f32, *r as f32),
        _ => (1.0, 1.0),
    };
    let (baseline, scale) = p.baseline().map_err(anyhow::Error::msg)?;
    let loss_type = p.loss_type().map_err(anyhow::Error::msg)?;

    let mut model = herd_engine::checkpoint::load_model(&policy_dir, &ctx.device)?;
    if p.dtype == Precision::Bf16 {
        super::training::bf16(&mut model)?;
    }
    p.lora.attach(ctx, &mut model)?;
    // The reference: the `reference` input, the adapter switched off, or
    // the policy as it starts (loaded again, frozen).
    let reference = match (p.beta > 0.0, ctx.inputs.get("reference"), &model.lora) {
        (false, _, _) => None,
        (true, Some(dir), _) => Some(
            herd_engine::checkpoint::load_model(dir, &ctx.device).context("input `reference`")?,
        ),
        (true, None, Some(_)) => None,
        (true, None, None) => Some(herd_engine::checkpoint::load_model(
            &policy_dir,
            &ctx.device,
        )?),
    };
    let rollouts_per_step = p.prompts_per_step * p.group_size;
    let micro_batches = rollouts_per_step.div_ceil(p.batch_size);
    let total_updates = p.steps * p.num_iterations as u64;
    let mut trainer = Trainer::new(
        model.trainable_params(),
        TrainConfig {
            lr: p.lr,
            steps: total_updates,
            warmup_steps: p.warmup_steps,
            decay: p.decay,
            min_lr_ratio: p.min_lr_ratio,
            weight_decay: p.weight_decay,
            grad_clip: p.grad_clip,
            grad_accum: micro_batches,
            ..TrainConfig::default()
        },
    )?;
    model.set_checkpointing(p.activation_checkpointing);
    let stops = chat.stop_ids();
    let pad = chat.special.pad;
    let mut rng = Rng::new(ctx.seed);
    let mut order: Vec<usize> = vec![];
    let mut record = String::new();
    let mut last = vec![];
    let mut update = 0u64;
    let mut rewards_all = 0.0f64;
    for step in 1..=p.steps {
        let started = std::time::Instant::now();
        // The step's prompts: a seeded shuffle, reshuffled when used up.
        let mut picked = Vec::with_capacity(p.prompts_per_step);
        while picked.len() < p.prompts_per_step {
            if order.is_empty() {
                order = (0..prompts.len()).rev().collect();
                rng.shuffle(&mut order);
            }
            picked.push(order.pop().expect("refilled"));
        }
        let encoded: Vec<Vec<u32>> = picked.iter().map(|i| prompts[*i].ids.clone()).collect();
        let sampling = herd_engine::generate::SamplingConfig {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            seed: ctx.seed.wrapping_add(step.wrapping_mul(0x9E37_79B9)),
            stop_ids: stops.clone(),
        };
        if let Some(l) = &model.lora {
            l.set_training(false, 0);
        }
        let sampled = herd_engine::generate::sample_many(
            &model,
            &encoded,
            &vec![p.group_size; picked.len()],
            &sampling,
            pad,
            p.batch_size.max(p.group_size),
            &|_| {},
        )?;
        let generated = started.elapsed().as_secs_f64();
        // Score every completion.
        let mut texts = Vec::with_capacity(rollouts_per_step);
        let (mut verifier_rewards, mut rm_rewards) = (vec![], vec![]);
        for (i, group) in picked.iter().zip(&sampled) {
            let prompt = &prompts[*i];
            let g_texts: Vec<String> = group
                .iter()
                .map(|c| chat.decode(c))
                .collect::<Result<_, _>>()?;
            if let Some(rule) = &rule {
                verifier_rewards.extend(
                    g_texts
                        .iter()
                        .map(|t| rule.score(t, prompt.answer.as_deref())),
                );
            }
            if let Some((rm, rm_chat)) = &rm {
                rm_rewards.extend(score(rm, rm_chat, &prompt.messages, &g_texts)?);
            }
            texts.extend(g_texts);
        }
        if let Some(program) = &program {
            let items: Vec<crate::verifiers::Scored> = texts
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let prompt = &prompts[picked[k / p.group_size]];
                    crate::verifiers::Scored {
                        prompt: &prompt.messages,
                        completion: t,
                        answer: prompt.answer.as_deref(),
                        group: k / p.group_size,
                        index: k % p.group_size,
                    }
                })
                .collect();
            verifier_rewards = program
                .score(&items)
                .map_err(|e| anyhow::anyhow!("step {step}: {e}"))?;
        }
        if let Some(bad) = rm_rewards.iter().find(|r| !r.is_finite()) {
            bail!("step {step}: the reward model gave a non-finite reward ({bad})");
        }
        let rewards: Vec<f32> = (0..rollouts_per_step)
            .map(|k| {
                verifier_rewards.get(k).map_or(0.0, |v| weights.0 * v)
                    + rm_rewards.get(k).map_or(0.0, |r| weights.1 * r)
            })
            .collect();
        let (advantages, flat_groups) = grpo::advantages(&rewards, p.group_size, baseline, scale)?;
        let mut rollouts: Vec<Rollout> = vec![];
        let mut truncated = vec![];
        for (g, (i, group)) in picked.iter().zip(&sampled).enumerate() {
            for (j, completion) in group.iter().enumerate() {
                let ended = completion.last().is_some_and(|t| stops.contains(t));
                truncated.push(!ended);
                let counts = ended || !p.mask_truncated_completions;
                rollouts.push(Rollout {
                    prompt: prompts[*i].ids.clone(),
                    completion: completion.clone(),
                    mask: vec![counts; completion.len()],
                    advantage: advantages[g * p.group_size + j],
                    old_logps: None,
                    ref_logps: None,
                });
            }
        }
        let tokens_in_batch: usize = rollouts.iter().map(Rollout::counted).sum();
        // Chunks with no counted token (every completion masked) train
        // nothing: they are skipped, and a step with none at all too.
        let chunks: Vec<Vec<usize>> = (0..rollouts.len())
            .collect::<Vec<_>>()
            .chunks(p.batch_size)
            .map(|c| c.to_vec())
            .collect();
        if tokens_in_batch > 0 {
            if let Some(r) = &reference {
                let lp =
                    grpo::rollout_logps(r, &counted_only(&rollouts), pad, p.temperature as f32)?;
                attach(&mut rollouts, lp, |r, v| r.ref_logps = Some(v));
            } else if p.beta > 0.0 {
                let lora = model.lora.as_ref().expect("a reference or an adapter");
                lora.set_enabled(false);
                let lp = grpo::rollout_logps(
                    &model,
                    &counted_only(&rollouts),
                    pad,
                    p.temperature as f32,
                );
                lora.set_enabled(true);
                attach(&mut rollouts, lp?, |r, v| r.ref_logps = Some(v));
            }
            if p.num_iterations > 1 {
                let lp = grpo::rollout_logps(
                    &model,
                    &counted_only(&rollouts),
                    pad,
                    p.temperature as f32,
                )?;
                attach(&mut rollouts, lp, |r, v| r.old_logps = Some(v));
            }
        }
        let cfg = GrpoLoss {
            epsilon_low: p.epsilon as f32,
            epsilon_high: p.epsilon_high() as f32,
            beta: p.beta as f32,
            temperature: p.temperature as f32,
            loss_type,
            max_completion_length: p.max_new_tokens,
            tokens_in_batch,
            micro_batches,
        };
        let mut sampler_logps: Vec<Option<f32>> = vec![None; rollouts.len()];
        let mut step_metrics: Vec<(String, f64)> = vec![];
        for iteration in 0..p.num_iterations {
            if tokens_in_batch == 0 {
                break;
            }
            update += 1;
            if let Some(l) = &model.lora {
                l.set_training(true, ctx.seed.wrapping_add(update));
            }
            let mut seen: Vec<(f32, f32, f32, f32, f32, usize)> = vec![];
            let stats = trainer.step_with(
                |k| {
                    let idx = &chunks[k];
                    let part: Vec<Rollout> = idx.iter().map(|i| rollouts[*i].clone()).collect();
                    if part.iter().all(|r| r.counted() == 0) {
                        // Nothing counts here: a zero loss over every
                        // trained weight (each gets a zero gradient).
                        let mut zero = None;
                        for (_, v) in model.trainable_params() {
                            // Times a zero tensor, not the scalar 0: candle's
                            // backward skips an affine map by 0 altogether.
                            let s = v.as_tensor().sum_all()?;
                            let t = s.mul(&s.zeros_like()?)?;
                            zero = Some(match zero {
                                None => t,
                                Some(z) => (z + t)?,
                            });
                        }
                        return zero.ok_or_else(|| {
                            herd_engine::EngineError::Input("nothing to train".into())
                        });
                    }
                    let out = grpo::grpo_loss(&model, &part, pad, &cfg)?;
                    if iteration == 0 {
                        let mut at = 0;
                        for (i, r) in idx.iter().zip(&part) {
                            let n = r.counted();
                            sampler_logps[*i] = Some(out.logps[at..at + n].iter().sum());
                            at += n;
                        }
                    }
                    seen.push((
                        out.kl,
                        out.clip_low,
                        out.clip_high,
                        out.clip_region,
                        out.entropy,
                        out.tokens,
                    ));
                    Ok(out.loss)
                },
                |store| model.finish_backward(store),
            )?;
            // Token-weighted means over the micro-batches, as TRL's
            // global masked means.
            let total: usize = seen.iter().map(|s| s.5).sum::<usize>().max(1);
            let mean = |f: fn(&(f32, f32, f32, f32, f32, usize)) -> f32| {
                seen.iter().map(|s| f(s) as f64 * s.5 as f64).sum::<f64>() / total as f64
            };
            step_metrics = vec![
                ("loss".into(), stats.loss),
                ("grad_norm".into(), stats.grad_norm),
                ("lr".into(), stats.lr),
                ("kl".into(), mean(|s| s.0)),
                ("clip_ratio/low_mean".into(), mean(|s| s.1)),
                ("clip_ratio/high_mean".into(), mean(|s| s.2)),
                ("clip_ratio/region_mean".into(), mean(|s| s.3)),
                ("entropy".into(), mean(|s| s.4)),
            ];
        }
        let lengths: Vec<f64> = sampled.iter().flatten().map(|c| c.len() as f64).collect();
        let (r_mean, r_std) = mean_std(&rewards.iter().map(|x| *x as f64).collect::<Vec<_>>());
        rewards_all += r_mean;
        let mut points = vec![
            ("reward".to_string(), r_mean),
            ("reward_std".to_string(), r_std),
            ("frac_reward_zero_std".to_string(), flat_groups as f64),
            (
                "completion_length/mean".to_string(),
                lengths.iter().sum::<f64>() / lengths.len() as f64,
            ),
            (
                "completion_length/max".to_string(),
                lengths.iter().cloned().fold(0.0, f64::max),
            ),
            (
                "truncated_fraction".to_string(),
                truncated.iter().filter(|t| **t).count() as f64 / truncated.len() as f64,
            ),
        ];
        if !verifier_rewards.is_empty() {
            points.push((
                "reward/verifier_mean".into(),
                mean_std(
                    &verifier_rewards
                        .iter()
                        .map(|x| *x as f64)
                        .collect::<Vec<_>>(),
                )
                .0,
            ));
        }
        if !rm_rewards.is_empty() {
            let (m, s) = mean_std(&rm_rewards.iter().map(|x| *x as f64).collect::<Vec<_>>());
            points.push(("reward/rm_mean".into(), m));
            points.push(("reward/rm_std".into(), s));
        }
        points.extend(step_metrics);
        let secs = started.elapsed().as_secs_f64();
        points.push((
            "tokens_per_s".into(),
            (lengths.iter().sum::<f64>() + tokens_in_batch as f64 * p.num_iterations as f64)
                / secs.max(1e-9),
        ));
        points.push(("generation_share".into(), generated / secs.max(1e-9)));
        ctx.sink.metrics(step, &points)?;
        ctx.sink.progress(step, p.steps);
        if p.keep_rollouts {
            for (k, r) in rollouts.iter().enumerate() {
                let (g, j) = (k / p.group_size, k % p.group_size);
                let mut rewards_of = serde_json::Map::new();
                if let Some(v) = verifier_rewards.get(k) {
                    rewards_of.insert("verifier".into(), json!(v));
                }
                if let Some(v) = rm_rewards.get(k) {
                    rewards_of.insert("rm".into(), json!(v));
                }
                let row = json!({
                    "step": step,
                    "group": g,
                    "index": j,
                    "prompt": prompts[picked[g]].messages,
                    "answer": prompts[picked[g]].answer,
                    "completion": texts[k],
                    "rewards": rewards_of,
                    "reward": rewards[k],
                    "advantage": r.advantage,
                    "logprob": sampler_logps[k],
                    "tokens": r.completion.len(),
                    "truncated": truncated[k],
                });
                record.push_str(&serde_json::to_string(&row)?);
                record.push('\n');
            }
        }
        last = points;
    }
    model.set_checkpointing(false);
    let summary = json!({
        "steps": p.steps,
        "rollouts": p.steps as usize * rollouts_per_step,
        "reward_mean": rewards_all / p.steps as f64,
        "final": last.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    if p.keep_rollouts {
        let path = ctx.workdir.join("rollouts.jsonl");
        std::fs::write(&path, &record)?;
        ctx.sink.output(
            "rollouts",
            ArtifactKind::Rollouts,
            &path,
            json!({"rows": p.steps as usize * rollouts_per_step, "steps": p.steps, "group_size": p.group_size}),
        )?;
    }
    save_trained(ctx, &model, &policy_dir, summary.clone())?;
    Ok(summary)
}

/// The rollouts with at least one counted token (log-probs are computed for
/// those only).
fn counted_only(rollouts: &[Rollout]) -> Vec<Rollout> {
    rollouts
        .iter()
        .filter(|r| r.counted() > 0)
        .cloned()
        .collect()
}

/// Hand per-rollout values (for the counted rollouts, in order) back.
fn attach(rollouts: &mut [Rollout], values: Vec<Vec<f32>>, set: impl Fn(&mut Rollout, Vec<f32>)) {
    let mut values = values.into_iter();
    for r in rollouts.iter_mut() {
        if r.counted() > 0 {
            set(r, values.next().expect("one per counted rollout"));
        } else {
            set(r, vec![]);
        }
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}
