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
use herd_engine::grpo::{self, GrpoLoss, Rollout};
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use serde_json::{json, Value};

use super::generation::score;
use super::inputs::{chat_of, load_rows};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe};
use super::training::{save_trained, Precision};
use crate::data::PromptExample;
mod params;

use herd_core::{ArtifactKind, JobKind};
pub use params::Params;

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
    let rows: Vec<PromptExample> = load_rows(ctx.input("prompts")?)?;
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
    // Training tokens so far: the x axis "tokens seen" charts draw on.
    let mut tokens_seen = 0usize;
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
            rows_per_call(&ctx.device, p.group_size, rollouts_per_step),
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
        // Micro-batches: `batch_size` rollouts each, in order. One with no
        // counted token (every completion masked) trains nothing, and a
        // step with none at all takes no update.
        let chunks: Vec<std::ops::Range<usize>> = (0..rollouts.len())
            .step_by(p.batch_size)
            .map(|a| a..(a + p.batch_size).min(rollouts.len()))
            .collect();
        // The reference's and (μ > 1) the sampler's log-probs, no gradient,
        // a micro-batch at a time.
        let logps_of = |m: &herd_engine::Llama, rs: &[Rollout]| -> Result<Vec<Vec<f32>>> {
            let mut out = Vec::with_capacity(rs.len());
            for c in &chunks {
                if rs[c.clone()].iter().all(|r| r.counted() == 0) {
                    out.extend(c.clone().map(|_| vec![]));
                } else {
                    out.extend(grpo::rollout_logps(
                        m,
                        &rs[c.clone()],
                        pad,
                        p.temperature as f32,
                    )?);
                }
            }
            Ok(out)
        };
        if tokens_in_batch > 0 {
            let reference_logps = match (&reference, p.beta > 0.0) {
                (Some(r), _) => Some(logps_of(r, &rollouts)?),
                (None, true) => {
                    let lora = model.lora.as_ref().expect("a reference or an adapter");
                    lora.set_enabled(false);
                    let lp = logps_of(&model, &rollouts);
                    lora.set_enabled(true);
                    Some(lp?)
                }
                (None, false) => None,
            };
            let old_logps = (p.num_iterations > 1)
                .then(|| logps_of(&model, &rollouts))
                .transpose()?;
            for (k, r) in rollouts.iter_mut().enumerate() {
                r.ref_logps = reference_logps.as_ref().map(|x| x[k].clone());
                r.old_logps = old_logps.as_ref().map(|x| x[k].clone());
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
        let width = herd_engine::train::micro_batch_width(&model, micro_batches);
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
            let seen: std::sync::Mutex<Vec<(usize, MicroMetrics)>> = Default::default();
            let logps_seen = std::sync::Mutex::new(&mut sampler_logps);
            let stats = trainer.step_parallel(
                width,
                |k| {
                    let part = &rollouts[chunks[k].clone()];
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
                    let out = grpo::grpo_loss(&model, part, pad, &cfg)?;
                    if iteration == 0 {
                        let mut sampler_logps = logps_seen.lock().expect("log-probs");
                        let mut at = 0;
                        for (i, r) in chunks[k].clone().zip(part) {
                            let n = r.counted();
                            sampler_logps[i] = Some(out.logps[at..at + n].iter().sum());
                            at += n;
                        }
                    }
                    seen.lock().expect("metrics").push((
                        k,
                        MicroMetrics {
                            kl: out.kl,
                            clip_low: out.clip_low,
                            clip_high: out.clip_high,
                            clip_region: out.clip_region,
                            entropy: out.entropy,
                            tokens: out.tokens,
                        },
                    ));
                    Ok(out.loss)
                },
                |store| model.finish_backward(store),
            )?;
            // Token-weighted means over the micro-batches, as TRL's
            // global masked means, summed in micro-batch order.
            let mut seen = seen.into_inner().expect("metrics");
            seen.sort_by_key(|s| s.0);
            let seen: Vec<_> = seen.into_iter().map(|s| s.1).collect();
            let total: usize = seen.iter().map(|s| s.tokens).sum::<usize>().max(1);
            let mean = |f: fn(&MicroMetrics) -> f32| {
                seen.iter()
                    .map(|s| f(s) as f64 * s.tokens as f64)
                    .sum::<f64>()
                    / total as f64
            };
            step_metrics = vec![
                ("loss".into(), stats.loss),
                ("grad_norm".into(), stats.grad_norm),
                ("lr".into(), stats.lr),
                ("kl".into(), mean(|s| s.kl)),
                ("clip_ratio/low_mean".into(), mean(|s| s.clip_low)),
                ("clip_ratio/high_mean".into(), mean(|s| s.clip_high)),
                ("clip_ratio/region_mean".into(), mean(|s| s.clip_region)),
                ("entropy".into(), mean(|s| s.entropy)),
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
        tokens_seen += tokens_in_batch;
        points.push(("tokens_seen".into(), tokens_seen as f64));
        points.push(("generation_share".into(), generated / secs.max(1e-9)));
        points.push(("step_time".into(), secs));
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

fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// One micro-batch's metrics, weighted by its counted tokens when the
/// step's are averaged.
struct MicroMetrics {
    kl: f32,
    clip_low: f32,
    clip_high: f32,
    clip_region: f32,
    entropy: f32,
    tokens: usize,
}

/// Rows per sampling call (whole groups; a group's prompt prefills once).
/// On the CPU, calls of about 32 rows run side by side, one per core: on the
/// bench shape 16-row calls take the few-row dot kernel (3.64 s a step) and
/// one 64-row call spreads each small product over the cores (4.10 s),
/// against 3.29 s for 32 (`cargo bench -p herd-daemon --bench grpo_bench`).
/// An accelerator takes the step's rollouts in one call. Every row draws
/// from its own random stream, so this choice does not steer the sampling.
fn rows_per_call(device: &candle_core::Device, group: usize, rollouts: usize) -> usize {
    match device {
        candle_core::Device::Cpu => group.max(CPU_ROWS_PER_CALL),
        _ => rollouts,
    }
}

const CPU_ROWS_PER_CALL: usize = 32;
