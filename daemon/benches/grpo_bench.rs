//! One GRPO step on the bench shape (engine/benches/llama-bench.json): 8
//! prompts × a group of 8, 128-token prompts, 128 new tokens, temperature 1,
//! one update per step (μ = 1, β = 0, TRL's `dapo` loss, micro-batches of
//! 16), a `regex` verifier. The `grpo` job runs in-process as the worker
//! runs it; each step's time and generation share come from its own
//! metrics. Median of the steps after the first (warm-up).
//!
//!     cargo bench -p herd-daemon --bench grpo_bench [-- --keep DIR] [-- --steps N]
//!
//! `--keep DIR` leaves the model and prompts there, for the TRL peer
//! (`daemon/benches/grpo_trl_peer.py`): `daemon/benches/grpo_side_by_side.sh`
//! runs both in one go. 2 threads unless RAYON_NUM_THREADS is set.

use std::collections::BTreeMap;
use std::path::Path;

use herd_daemon::jobs::{self, JobContext, JobKind, MemorySink};
use herd_engine::chat::ChatFormat;
use serde_json::json;

/// The bench model with a tokenizer covering its whole vocabulary: byte
/// level, the Llama 3 specials, then plain added tokens up to the vocab
/// size (a random model samples every id; each must decode).
fn build_model(dir: &Path) -> ChatFormat {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/benches/llama-bench.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("bench config")).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("bench_batch");
    obj.remove("bench_seq");
    let cfg = herd_engine::LlamaConfig::from_json(&v, "llama-bench.json").unwrap();
    let vocab = cfg.vocab_size as usize;
    let model = herd_engine::Llama::init(cfg, 0, &candle_core::Device::Cpu).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let mut tok = herd_engine::chat::byte_tokenizer_json();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for id in 256 + added.len()..vocab {
        added.push(
            json!({"id": id, "content": format!("<x{id}>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false}),
        );
    }
    let tok_path = dir.join(herd_engine::checkpoint::TOKENIZER);
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let chat = ChatFormat::from_file(&tok_path).unwrap();
    for (name, j) in
        herd_engine::chat::hf_tokenizer_files(&chat, model.config.max_position_embeddings)
    {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&j).unwrap()).unwrap();
    }
    herd_engine::checkpoint::save_model(&model, dir, None).unwrap();
    chat
}

/// Eight user prompts whose chat encoding is exactly 128 tokens.
fn write_prompts(chat: &ChatFormat, path: &Path) {
    let mut body = String::new();
    for i in 0..8 {
        let mut text = format!("Question {i}: ");
        let len = |t: &str| {
            chat.encode_prompt(&[herd_engine::chat::Message::new("user", t)])
                .unwrap()
                .ids
                .len()
        };
        while len(&text) < 128 {
            text.push((b'a' + (text.len() % 26) as u8) as char);
        }
        assert_eq!(len(&text), 128);
        body += &json!({"prompt": text}).to_string();
        body.push('\n');
    }
    std::fs::write(path, body).unwrap();
}

fn main() {
    herd_engine::device::tune_allocator();
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        herd_engine::device::set_cpu_threads(2);
    }
    let args: Vec<String> = std::env::args().collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let steps: u64 = after("--steps").map_or(4, |s| s.parse().expect("--steps N"));
    let temp = tempfile::tempdir().unwrap();
    let dir = after("--keep").map_or(temp.path().to_path_buf(), Into::into);
    let model_dir = dir.join("model");
    let chat = build_model(&model_dir);
    let prompts = dir.join("prompts.jsonl");
    write_prompts(&chat, &prompts);

    let blobs = herd_store::BlobStore::open(&temp.path().join("blobs")).unwrap();
    let mut sink = MemorySink::new(blobs);
    let hp = json!({
        "steps": steps, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 128,
        "temperature": 1.0, "top_p": 1.0, "batch_size": 16, "lr": 1e-6, "beta": 0.0,
        "num_iterations": 1, "loss_type": "dapo", "verifier_rule": "regex",
        "verifier_pattern": "a",
    });
    let mut ctx = JobContext {
        kind: JobKind::Grpo,
        hyperparameters: jobs::effective_hyperparameters(JobKind::Grpo, &hp).unwrap(),
        seed: 0,
        inputs: BTreeMap::from([
            ("policy".to_string(), model_dir.clone()),
            ("prompts".to_string(), prompts.clone()),
        ]),
        workdir: temp.path().join("work"),
        device: candle_core::Device::Cpu,
        sink: &mut sink,
    };
    jobs::run(&mut ctx).unwrap();
    let median = |name: &str| {
        let mut v = sink.series(name)[1..].to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (step, share) = (median("step_time"), median("generation_share"));
    let new_tokens = median("completion_length/mean") * 64.0;
    println!(
        "herd grpo step: {step:.2} s ({:.0} new tokens/s over the step), generation {:.0}%, training {:.0}% ({} threads, {} timed steps)",
        new_tokens / step,
        share * 100.0,
        (1.0 - share) * 100.0,
        herd_engine::device::cpu_threads(),
        steps - 1
    );
    println!(
        "{}",
        json!({"step_s": step, "generation_share": share, "completion_mean": median("completion_length/mean")})
    );
}
