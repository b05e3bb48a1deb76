//! The `grpo` job's hyperparameters: what a step samples, how it is
//! rewarded and how the update is made, with their ranges.

use herd_engine::grpo::{Baseline, LossType, Scale};
use herd_engine::optim::Decay;
use serde::{Deserialize, Serialize};

use super::super::recipe::{Bound, Validate};
use super::super::training::{in_range, limits, LoraParams, Precision};
use crate::verifiers::Rule;

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
    pub(super) fn loss_type(&self) -> Result<LossType, String> {
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
    pub(super) fn baseline(&self) -> Result<(Baseline, Scale), String> {
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
    pub(super) fn rule(&self) -> Result<Option<Rule>, String> {
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
    pub(super) fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

impl Validate for Params {
    fn makes(&self, inputs: &[&str], output: &str) -> bool {
        match output {
            "rollouts" => self.keep_rollouts,
            _ => self.lora.makes(inputs, output),
        }
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
