//! What the recipes share: the sink they report through, the common training
//! hyperparameters, the step loop, and loading inputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use herd_engine::chat::{ChatFormat, Encoded};
use herd_engine::optim::Decay;
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{self, Dataset, DatasetKind};
use herd_core::ArtifactKind;

use super::JobContext;

/// Where a running job reports.
pub trait Sink {
    /// Metrics of one step (computed with the weights before its update).
    fn metrics(&mut self, step: u64, points: &[(String, f64)]) -> Result<()>;
    fn progress(&mut self, done: u64, total: u64);
    /// Record an output (a checkpoint directory or a dataset file); returns its hash.
    fn output(
        &mut self,
        name: &str,
        artifact: ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<String>;
    fn note(&mut self, message: &str);
}

/// A sink that keeps everything in memory and hashes outputs with the blob
/// store's rules (tests, the in-process runner).
pub struct MemorySink {
    pub blobs: herd_store::BlobStore,
    pub metrics: Vec<(u64, Vec<(String, f64)>)>,
    pub outputs: Vec<(String, ArtifactKind, String, Value)>,
    pub notes: Vec<String>,
}

impl MemorySink {
    pub fn new(blobs: herd_store::BlobStore) -> Self {
        MemorySink {
            blobs,
            metrics: vec![],
            outputs: vec![],
            notes: vec![],
        }
    }
    /// The values of one metric, in step order.
    pub fn series(&self, name: &str) -> Vec<f64> {
        self.metrics
            .iter()
            .flat_map(|(_, p)| p.iter().filter(|(n, _)| n == name).map(|(_, v)| *v))
            .collect()
    }
    pub fn output_hash(&self, name: &str) -> Option<&str> {
        self.outputs
            .iter()
            .find(|o| o.0 == name)
            .map(|o| o.2.as_str())
    }
}

pub fn store_output(blobs: &herd_store::BlobStore, path: &Path) -> Result<String> {
    Ok(if path.is_dir() {
        blobs.put_dir(path)?.id
    } else {
        blobs.put_file(path)?.id
    })
}

impl Sink for MemorySink {
    fn metrics(&mut self, step: u64, points: &[(String, f64)]) -> Result<()> {
        self.metrics.push((step, points.to_vec()));
        Ok(())
    }
    fn progress(&mut self, _done: u64, _total: u64) {}
    fn output(
        &mut self,
        name: &str,
        artifact: ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<String> {
        let hash = store_output(&self.blobs, path)?;
        self.outputs
            .push((name.to_string(), artifact, hash.clone(), summary));
        Ok(hash)
    }
    fn note(&mut self, message: &str) {
        self.notes.push(message.to_string());
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
        }
    }
}

/// Upper bounds that keep a job's time and memory sane: far above any real
/// run on one machine, far below what would run for ever or abort the
/// worker on an allocation.
pub mod limits {
    pub const MAX_STEPS: u64 = 10_000_000;
    pub const MAX_EPOCHS: f64 = 10_000.0;
    pub const MAX_BATCH: usize = 4096;
    pub const MAX_GRAD_ACCUM: usize = 4096;
    pub const MAX_SEQ_LEN: usize = 131_072;
    /// Tokens in one micro-batch (batch_size x max_seq_len).
    pub const MAX_BATCH_TOKENS: usize = 1 << 22;
    pub const MAX_NEW_TOKENS: usize = 32_768;
    pub const MAX_SAMPLES_PER_PROMPT: usize = 1024;
}

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
    pub fn validate(&self) -> Result<(), String> {
        use limits::*;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err("lr must be a positive number".into());
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

/// Load a dataset input, insisting on its kind.
pub fn load_dataset(path: &Path, want: DatasetKind) -> Result<Dataset> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let ds = data::parse_bytes(want, &bytes, &path.display().to_string())?;
    Ok(ds)
}

pub fn chat_of(model_dir: &Path) -> Result<ChatFormat> {
    Ok(herd_engine::checkpoint::load_chat(model_dir)?)
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

/// Drive `total` optimizer steps over `n` examples in seeded shuffled order.
/// `loss_of(batch_indices, extras)` returns one micro-batch's loss and its
/// token count, and may push extra metrics.
pub fn train_loop(
    ctx: &mut JobContext,
    params: Vec<(String, candle_core::Var)>,
    tp: &TrainParams,
    n: usize,
    mut loss_of: impl FnMut(&[usize], &mut Vec<(String, f64)>) -> Result<(Tensor, usize)>,
) -> Result<Vec<(String, f64)>> {
    if n == 0 {
        bail!("no training examples left");
    }
    let cfg = tp.train_config(n);
    let total = cfg.steps;
    let mut trainer = Trainer::new(params, cfg)?;
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
    for step in 1..=total {
        let batches: Vec<Vec<usize>> = (0..tp.grad_accum).map(|_| next_batch(&mut rng)).collect();
        let mut extras: Vec<(String, f64)> = vec![];
        let mut tokens = 0usize;
        let stats = trainer.step(|i| {
            let (loss, t) = loss_of(&batches[i], &mut extras)
                .map_err(|e| herd_engine::EngineError::Input(format!("{e:#}")))?;
            tokens += t;
            Ok(loss)
        })?;
        let mut points = vec![
            ("loss".to_string(), stats.loss),
            ("grad_norm".to_string(), stats.grad_norm),
            ("lr".to_string(), stats.lr),
            ("tokens".to_string(), tokens as f64),
        ];
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
    Ok(last)
}

/// Save a model into the workdir and record it as output `checkpoint`.
pub fn save_checkpoint(
    ctx: &mut JobContext,
    model: &herd_engine::Llama,
    tokenizer_from: &Path,
    summary: Value,
) -> Result<String> {
    let out: PathBuf = ctx.workdir.join("checkpoint");
    herd_engine::checkpoint::save_model(
        model,
        &out,
        Some(&tokenizer_from.join(herd_engine::checkpoint::TOKENIZER)),
    )?;
    ctx.sink
        .output("checkpoint", ArtifactKind::Checkpoint, &out, summary)
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

/// Prompt + completion as one encoded sequence.
pub fn prompt_completion(
    chat: &ChatFormat,
    prompt: &[herd_engine::chat::Message],
    completion: &str,
) -> Result<Encoded> {
    let mut e = chat.encode_prompt(prompt)?;
    e.extend(&chat.encode_completion(completion)?);
    Ok(e)
}

/// Sampling settings shared by the jobs that generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Rows per generation call.
    pub batch_size: usize,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            temperature: 0.8,
            top_p: 0.95,
            max_new_tokens: 64,
            batch_size: 16,
        }
    }
}

impl GenParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite())
            || !(self.top_p > 0.0 && self.top_p <= 1.0)
        {
            return Err("temperature must be >= 0 and top_p in (0, 1]".into());
        }
        if self.temperature > 100.0 {
            return Err("temperature must be <= 100".into());
        }
        in_range(
            "max_new_tokens",
            self.max_new_tokens,
            1,
            limits::MAX_NEW_TOKENS,
        )?;
        in_range("batch_size", self.batch_size, 1, limits::MAX_BATCH)?;
        Ok(())
    }
}

/// `n` completions (text) per prompt, generated in batches; deterministic
/// for a seed (each batch gets seed + batch index).
pub fn complete(
    model: &herd_engine::Llama,
    chat: &ChatFormat,
    prompts: &[Vec<herd_engine::chat::Message>],
    n: usize,
    g: &GenParams,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<String>>> {
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Ok(chat.encode_prompt(p)?.ids))
        .collect::<Result<_>>()?;
    let rows: Vec<usize> = (0..prompts.len())
        .flat_map(|i| std::iter::repeat_n(i, n))
        .collect();
    let mut out: Vec<Vec<String>> = vec![vec![]; prompts.len()];
    let total = rows.len();
    for (bi, chunk) in rows.chunks(g.batch_size).enumerate() {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|i| encoded[*i].clone()).collect();
        let cfg = herd_engine::generate::SamplingConfig {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            seed: seed.wrapping_add(bi as u64),
            stop_ids: chat.stop_ids(),
        };
        let gen = herd_engine::generate::generate(model, &batch, &cfg, chat.special.pad)?;
        for (i, ids) in chunk.iter().zip(gen) {
            out[*i].push(chat.decode(&ids)?.trim().to_string());
        }
        progress((bi * g.batch_size + chunk.len()).min(total), total);
    }
    Ok(out)
}

/// RM scores of completions: one packed row per prompt (prompt once).
pub fn score(
    rm: &herd_engine::Llama,
    chat: &ChatFormat,
    prompt: &[herd_engine::chat::Message],
    completions: &[String],
) -> Result<Vec<f32>> {
    let p = chat.encode_prompt(prompt)?.ids;
    let responses: Vec<Vec<u32>> = completions
        .iter()
        .map(|c| Ok(chat.encode_completion(c)?.ids))
        .collect::<Result<_>>()?;
    let mut out = vec![];
    // rm_rewards wants >= 2 responses per row; score in rows of up to 16.
    for chunk in responses.chunks(16) {
        let mut resp = chunk.to_vec();
        let real = resp.len();
        if real == 1 {
            resp.push(resp[0].clone());
        }
        let ex = herd_engine::objective::Ranked {
            prompt: p.clone(),
            responses: resp,
            margin: 0.0,
        };
        let (r, _) = herd_engine::objective::rm_rewards(rm, &[ex], true, None, chat.special.pad)?;
        out.extend(r.to_vec1::<f32>()?.into_iter().take(real));
    }
    Ok(out)
}
