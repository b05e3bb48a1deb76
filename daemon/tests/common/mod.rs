//! What the job tests share: fixtures, running a recipe in-process, small
//! models and dataset files.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use herd_daemon::jobs::{self, JobContext, JobKind, MemorySink};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    std::env::var("HERD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny")
        })
}

pub struct Run {
    pub sink: MemorySink,
    pub summary: anyhow::Result<Value>,
}

pub fn run(kind: JobKind, hp: Value, seed: u64, inputs: &[(&str, &Path)], scratch: &Path) -> Run {
    let blobs = herd_store::BlobStore::open(&scratch.join("blobs")).unwrap();
    let mut sink = MemorySink::new(blobs);
    let effective = jobs::effective_hyperparameters(kind, &hp).unwrap();
    let workdir = scratch.join(format!("work-{}-{}", kind.as_str(), uuid::Uuid::now_v7()));
    let mut ctx = JobContext {
        kind,
        hyperparameters: effective,
        seed,
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_path_buf()))
            .collect::<BTreeMap<_, _>>(),
        workdir,
        device: candle_core::Device::Cpu,
        sink: &mut sink,
    };
    let summary = jobs::run(&mut ctx);
    Run { sink, summary }
}

/// The bytes of a job's output `name`, as text.
pub fn output_text(sink: &MemorySink, name: &str) -> String {
    let hash = sink.output_hash(name).expect("the job made that output");
    std::fs::read_to_string(sink.blobs.path_of(hash).unwrap()).unwrap()
}

pub fn write(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    p
}

/// A small random model with the fixtures' tokenizer.
pub fn small_model(dir: &Path, seed: u64) -> PathBuf {
    let mut cfg = herd_engine::LlamaConfig::from_file(&fixtures().join("ref/config.json")).unwrap();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 1;
    cfg.head_dim = 16;
    let m = herd_engine::Llama::init(cfg, seed, &candle_core::Device::Cpu).unwrap();
    let out = dir.join(format!("model-{seed}"));
    herd_engine::checkpoint::save_model(&m, &out, Some(&fixtures().join("ref"))).unwrap();
    out
}
