//! What the training recipes share: their hyperparameters with the bounds
//! that keep a run sane, the step loop, and writing the checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use herd_core::ArtifactKind;
use herd_engine::optim::Decay;
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::recipe::{Bound, JobContext, Validate};

/// The dtype a training job computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

/// `dtype=bf16` on this model's device: a GPU computes in bf16; the CPU
/// backend has no bf16 arithmetic (its matmul widens to f32), so there a
/// frozen base is stored in bf16 and the arithmetic stays f32, and full
/// fine-tuning (f32 master weights either way) is unchanged.
pub fn bf16(model: &mut herd_engine::Llama) -> Result<()> {
    if !model.device.is_cpu() {
        model.compute_in_bf16()?;
    } else if model.is_base_frozen() {
        model.store_frozen_base_in_bf16()?;
    }
    Ok(())
}

/// A training recipe's hyperparameters: what rm, sft and dpo share (the
/// schedule and optimizer, LoRA) and the recipe's own, one flat set on the
/// wire (`lr`, `lora_rank` and `beta` side by side).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, bound(deserialize = "Own: OwnParams + Deserialize<'de>"))]
pub struct Trained<Own> {
    #[serde(flatten)]
    pub train: TrainParams,
    #[serde(flatten)]
    pub lora: LoraParams,
    #[serde(flatten)]
    pub own: Own,
}

/// What a training recipe adds to the shared hyperparameters of [`Trained`].
pub trait OwnParams: Default + Validate {
    /// The shared settings' defaults for this recipe (dpo: two pairs a batch).
    fn train_defaults() -> TrainParams {
        TrainParams::default()
    }
}

impl<Own: OwnParams> Default for Trained<Own> {
    fn default() -> Self {
        Trained {
            train: Own::train_defaults(),
            lora: LoraParams::default(),
            own: Own::default(),
        }
    }
}

impl<Own> Trained<Own> {
    /// The model the job trains, made ready: its adapter attached (see
    /// [`LoraParams::attach`]) and its compute dtype set.
    pub fn prepare(&self, ctx: &JobContext, model: &mut herd_engine::Llama) -> Result<()> {
        self.lora.attach(ctx, model)?;
        if self.train.dtype == Precision::Bf16 {
            bf16(model)?;
        }
        Ok(())
    }
}

impl<Own: OwnParams> Validate for Trained<Own> {
    fn makes(&self, inputs: &[&str], output: &str) -> bool {
        self.lora.makes(inputs, output)
    }
    fn validate(&self) -> Result<(), String> {
        self.train.validate()?;
        self.lora.validate()?;
        self.own.validate()
    }
    fn bounds() -> Vec<Bound> {
        let mut b = TrainParams::bounds();
        b.extend(LoraParams::bounds());
        b.extend(Own::bounds());
        b
    }
}

/// The hyperparameters every training job shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainParams {
    pub lr: f64,
    /// Optimizer steps; 0 means derive from `epochs`.
    pub steps: u64,
    pub epochs: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// Max global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub max_seq_len: usize,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    /// `bf16`: on a GPU compute in bf16 (a frozen base stored in bf16; what
    /// trains kept as f32 master weights); on the CPU store a frozen base in
    /// bf16 and compute in f32 (see [`bf16`]). `f32` is the reference.
    pub dtype: Precision,
    /// Recompute each block in backward instead of keeping its activations:
    /// less memory, about one more forward pass of time. Same gradients.
    pub activation_checkpointing: bool,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            lr: 1e-5,
            steps: 0,
            epochs: 1.0,
            batch_size: 4,
            grad_accum: 1,
            warmup_steps: 0,
            weight_decay: 0.0,
            grad_clip: 1.0,
            max_seq_len: 512,
            decay: Decay::Cosine,
            min_lr_ratio: 0.0,
            dtype: Precision::F32,
            activation_checkpointing: false,
        }
    }
}

/// LoRA, shared by sft, dpo and rm: `lora_rank` 0 (the default) trains
/// every weight; above 0 a fresh adapter of that rank trains on a frozen
/// base. An `adapter` input continues that adapter instead (its own rank,
/// alpha and targets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraParams {
    pub lora_rank: usize,
    /// Scale = lora_alpha / lora_rank.
    pub lora_alpha: f64,
    /// Projections to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj).
    pub lora_targets: Vec<String>,
    /// Dropout on the adapter's input while training.
    pub lora_dropout: f64,
}

impl Default for LoraParams {
    fn default() -> Self {
        LoraParams {
            lora_rank: 0,
            lora_alpha: 16.0,
            lora_targets: herd_engine::lora::PROJECTIONS
                .iter()
                .map(|p| p.0.to_string())
                .collect(),
            lora_dropout: 0.0,
        }
    }
}

impl LoraParams {
    pub fn bounds() -> Vec<Bound> {
        vec![
            Bound::closed("lora_rank", 0.0, limits::MAX_LORA_RANK as f64),
            Bound::at_least("lora_alpha", 0.0, false),
            Bound {
                name: "lora_dropout",
                min: 0.0,
                min_inclusive: true,
                max: Some(1.0),
                max_inclusive: false,
            },
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        in_range("lora_rank", self.lora_rank, 0, limits::MAX_LORA_RANK)?;
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err("lora_alpha must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if self.lora_targets.is_empty() {
            return Err("lora_targets names no projection".into());
        }
        for (i, t) in self.lora_targets.iter().enumerate() {
            if !herd_engine::lora::PROJECTIONS.iter().any(|p| p.0 == t) {
                return Err(format!(
                    "lora_targets: {t:?} is not a projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                ));
            }
            if self.lora_targets[..i].contains(t) {
                return Err(format!("lora_targets: {t:?} is listed twice"));
            }
        }
        Ok(())
    }

    /// Whether the job trains an adapter rather than every weight.
    pub fn active(&self, ctx: &JobContext) -> bool {
        self.trains_adapter(&ctx.inputs.keys().map(|k| k.as_str()).collect::<Vec<_>>())
    }

    fn trains_adapter(&self, inputs: &[&str]) -> bool {
        self.lora_rank > 0 || inputs.contains(&"adapter")
    }

    /// Which of [`TRAINED`] the job makes: `adapter` with LoRA, else
    /// `checkpoint` (other outputs: always).
    pub fn makes(&self, inputs: &[&str], output: &str) -> bool {
        match output {
            "checkpoint" => !self.trains_adapter(inputs),
            "adapter" => self.trains_adapter(inputs),
            _ => true,
        }
    }

    /// Attach what the job trains to `model` (loaded from input `model`):
    /// the `adapter` input, or a fresh adapter of `lora_rank`; then freeze
    /// the base. With neither, every weight trains and nothing changes.
    pub fn attach(&self, ctx: &JobContext, model: &mut herd_engine::Llama) -> Result<()> {
        if let Some(dir) = ctx.inputs.get("adapter") {
            herd_engine::checkpoint::load_adapter(model, dir).context("input `adapter`")?;
            let lora = model.lora.as_mut().expect("just attached");
            // A reward model may continue a language model's adapter: its
            // score head starts fresh, as for any rm, and is saved with it.
            // (A reward model's adapter on a language model is refused by
            // load_adapter.)
            if self.lora_rank != 0 && self.lora_rank != lora.config.rank {
                bail!(
                    "lora_rank {} differs from input `adapter`'s rank {}: leave lora_rank at 0 to continue the adapter as it is",
                    self.lora_rank,
                    lora.config.rank
                );
            }
            lora.config.dropout = self.lora_dropout;
        } else if self.lora_rank > 0 {
            let config = herd_engine::lora::LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha,
                targets: herd_engine::lora::PROJECTIONS
                    .iter()
                    .map(|p| p.0)
                    .filter(|p| self.lora_targets.iter().any(|t| t == p))
                    .collect(),
                rslora: false,
                dropout: self.lora_dropout,
                score: false,
            };
            herd_engine::checkpoint::attach_new_adapter(model, config, ctx.seed ^ 0x10_4a)?;
        } else {
            return Ok(());
        }
        model.freeze_base(true);
        model
            .lora
            .as_ref()
            .expect("attached")
            .set_training(true, ctx.seed ^ 0xd0_d0);
        Ok(())
    }
}

/// Upper bounds that keep a job's time and memory sane: far above any real
/// run on one machine, far below what would run for ever or abort the
/// worker on an allocation.
pub mod limits {
    /// A learning rate past 1 moves AdamW's weights by more than their scale
    /// each step: it only diverges.
    pub const MAX_LR: f64 = 1.0;
    pub const MAX_STEPS: u64 = 10_000_000;
    pub const MAX_EPOCHS: f64 = 10_000.0;
    pub const MAX_BATCH: usize = 4096;
    pub const MAX_GRAD_ACCUM: usize = 4096;
    pub const MAX_SEQ_LEN: usize = 131_072;
    /// Tokens in one micro-batch (batch_size x max_seq_len).
    pub const MAX_BATCH_TOKENS: usize = 1 << 22;
    pub const MAX_NEW_TOKENS: usize = 32_768;
    pub const MAX_SAMPLES_PER_PROMPT: usize = 1024;
    pub const MAX_LORA_RANK: usize = 4096;
}

/// What a training recipe's inputs accept: `data` preference pairs (rm,
/// dpo) or dialogs (sft), `adapter` an adapter to keep training; the rest
/// (model, reference) checkpoints.
pub const ON_PREFERENCES: super::recipe::Accepts = &[
    ("data", &[ArtifactKind::Preference]),
    ("adapter", &[ArtifactKind::Adapter]),
];
pub const ON_DIALOGS: super::recipe::Accepts = &[
    ("data", &[ArtifactKind::Sft]),
    ("adapter", &[ArtifactKind::Adapter]),
];

/// The inputs of a training recipe that trains one model on one dataset.
pub const MODEL_AND_DATA: super::recipe::InputNames = super::recipe::InputNames::Named {
    required: &["model", "data"],
    optional: &["adapter"],
};

/// `name` within `lo..=hi`, or an error that says both bounds.
pub fn in_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), String> {
    if v < lo || v > hi {
        return Err(format!("{name} must be in [{lo}, {hi}], got {v}"));
    }
    Ok(())
}

impl TrainParams {
    /// What `validate` enforces, field by field (see `Bound`).
    pub fn bounds() -> Vec<Bound> {
        use limits::*;
        vec![
            Bound::above("lr", 0.0, MAX_LR),
            Bound::closed("steps", 0.0, MAX_STEPS as f64),
            Bound::closed("warmup_steps", 0.0, MAX_STEPS as f64),
            Bound::above("epochs", 0.0, MAX_EPOCHS),
            Bound::closed("batch_size", 1.0, MAX_BATCH as f64),
            Bound::closed("grad_accum", 1.0, MAX_GRAD_ACCUM as f64),
            Bound::closed("max_seq_len", 2.0, MAX_SEQ_LEN as f64),
            Bound::at_least("weight_decay", 0.0, true),
            Bound::at_least("grad_clip", 0.0, true),
            Bound::closed("min_lr_ratio", 0.0, 1.0),
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        use limits::*;
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR) {
            return Err(format!(
                "lr must be in (0, {MAX_LR}] (a step of more than the weights themselves only diverges)"
            ));
        }
        in_range("steps", self.steps, 0, MAX_STEPS)?;
        in_range("warmup_steps", self.warmup_steps, 0, MAX_STEPS)?;
        in_range("batch_size", self.batch_size, 1, MAX_BATCH)?;
        in_range("grad_accum", self.grad_accum, 1, MAX_GRAD_ACCUM)?;
        in_range("max_seq_len", self.max_seq_len, 2, MAX_SEQ_LEN)?;
        if self.batch_size * self.max_seq_len > MAX_BATCH_TOKENS {
            return Err(format!(
                "batch_size x max_seq_len = {} tokens per micro-batch; the limit is {MAX_BATCH_TOKENS} (use grad_accum)",
                self.batch_size * self.max_seq_len
            ));
        }
        if self.steps == 0
            && !(self.epochs.is_finite() && self.epochs > 0.0 && self.epochs <= MAX_EPOCHS)
        {
            return Err(format!("give steps > 0 or epochs in (0, {MAX_EPOCHS}]"));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_seq_len < 2 {
            return Err("batch_size and grad_accum must be >= 1, max_seq_len >= 2".into());
        }
        if self.steps == 0 && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err("give steps > 0 or epochs > 0".into());
        }
        if self.weight_decay < 0.0
            || self.grad_clip < 0.0
            || !(0.0..=1.0).contains(&self.min_lr_ratio)
        {
            return Err("weight_decay and grad_clip must be >= 0, min_lr_ratio in [0, 1]".into());
        }
        Ok(())
    }

    pub fn total_steps(&self, examples: usize) -> u64 {
        if self.steps > 0 {
            return self.steps;
        }
        let per_step = (self.batch_size * self.grad_accum) as f64;
        ((self.epochs * examples as f64) / per_step).ceil().max(1.0) as u64
    }

    pub fn train_config(&self, examples: usize) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            steps: self.total_steps(examples),
            warmup_steps: self.warmup_steps,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            grad_accum: self.grad_accum,
            ..TrainConfig::default()
        }
    }
}

/// Drive `total` optimizer steps of `model`'s trainable parameters over `n`
/// examples in seeded shuffled order. `loss_of(batch_indices, extras)`
/// returns one micro-batch's loss and its token count, and may push extra
/// metrics.
pub fn train_loop(
    ctx: &mut JobContext,
    model: &herd_engine::Llama,
    tp: &TrainParams,
    n: usize,
    mut loss_of: impl FnMut(&[usize], &mut Vec<(String, f64)>) -> Result<(Tensor, usize)>,
) -> Result<Vec<(String, f64)>> {
    if n == 0 {
        bail!("no training examples left");
    }
    let cfg = tp.train_config(n);
    let total = cfg.steps;
    let mut trainer = Trainer::new(model.trainable_params(), cfg)?;
    model.set_checkpointing(tp.activation_checkpointing);
    let mut rng = Rng::new(ctx.seed);
    let mut order: Vec<usize> = vec![];
    let mut cursor = 0;
    let mut next_batch = |rng: &mut Rng| -> Vec<usize> {
        let mut b = Vec::with_capacity(tp.batch_size);
        while b.len() < tp.batch_size.min(n) {
            if cursor >= order.len() {
                order = (0..n).collect();
                rng.shuffle(&mut order);
                cursor = 0;
            }
            b.push(order[cursor]);
            cursor += 1;
        }
        b
    };
    let mut last = vec![];
    // Tokens trained on so far: the x axis "tokens seen" charts draw on.
    let mut tokens_seen = 0usize;
    for step in 1..=total {
        let batches: Vec<Vec<usize>> = (0..tp.grad_accum).map(|_| next_batch(&mut rng)).collect();
        let mut extras: Vec<(String, f64)> = vec![];
        let mut tokens = 0usize;
        let stats = trainer.step_with(
            |i| {
                let (loss, t) = loss_of(&batches[i], &mut extras)
                    .map_err(|e| herd_engine::EngineError::Input(format!("{e:#}")))?;
                tokens += t;
                Ok(loss)
            },
            |store| model.finish_backward(store),
        )?;
        let mut points = vec![
            ("loss".to_string(), stats.loss),
            ("grad_norm".to_string(), stats.grad_norm),
            ("lr".to_string(), stats.lr),
            ("tokens".to_string(), tokens as f64),
            ("tokens_seen".to_string(), (tokens_seen + tokens) as f64),
        ];
        tokens_seen += tokens;
        // Average extras over micro-batches by name.
        let mut names: Vec<String> = extras.iter().map(|e| e.0.clone()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let vals: Vec<f64> = extras.iter().filter(|e| e.0 == name).map(|e| e.1).collect();
            points.push((name, vals.iter().sum::<f64>() / vals.len() as f64));
        }
        ctx.sink.metrics(step, &points)?;
        ctx.sink.progress(step, total);
        last = points;
    }
    model.set_checkpointing(false);
    Ok(last)
}

/// What a training recipe makes: a whole checkpoint, or (LoRA) an adapter
/// of its `model` input; one of the two.
pub const TRAINED: &[(&str, super::recipe::OutputKind)] = &[
    (
        "checkpoint",
        super::recipe::OutputKind::Is(ArtifactKind::Checkpoint),
    ),
    (
        "adapter",
        super::recipe::OutputKind::Is(ArtifactKind::Adapter),
    ),
];

/// Record what a training job made: the adapter (output `adapter`) when it
/// trained one, else the whole model (output `checkpoint`).
pub fn save_trained(
    ctx: &mut JobContext,
    model: &herd_engine::Llama,
    trained_from: &Path,
    summary: Value,
) -> Result<String> {
    // Never record weights that can't be used: a diverged last update
    // (after its loss was checked) leaves non-finite values.
    if let Some(name) = herd_engine::optim::first_non_finite(&model.trainable_params())? {
        anyhow::bail!(
            "training diverged: after the last step `{name}` holds non-finite values, so nothing was saved (lower lr, or set grad_clip)"
        );
    }
    if let Some(lora) = &model.lora {
        lora.set_training(false, 0);
        let out: PathBuf = ctx.workdir.join("adapter");
        // PEFT's base_model_name_or_path: the base's directory name (its
        // content hash when the daemon materialized it).
        let base = trained_from
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        herd_engine::checkpoint::save_adapter(model, &out, &base)?;
        return ctx
            .sink
            .output("adapter", ArtifactKind::Adapter, &out, summary);
    }
    let out: PathBuf = ctx.workdir.join("checkpoint");
    herd_engine::checkpoint::save_model(model, &out, Some(trained_from))?;
    ctx.sink
        .output("checkpoint", ArtifactKind::Checkpoint, &out, summary)
}
