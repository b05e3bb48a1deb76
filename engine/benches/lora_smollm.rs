//! One LoRA SFT step on a SmolLM-135M-shaped model (a real, widely
//! post-trained Llama-architecture shape: vocab 49152, hidden 576, 30
//! layers, 9 heads / 3 KV heads, intermediate 1536, tied embeddings),
//! random init in memory, batch 8 × 256, LoRA rank 16 / alpha 32 on all
//! seven projections, base frozen, AdamW on the adapter, 2 threads: step
//! time (median of 3 after a warm-up) and peak RSS of the steps. Beside it,
//! what the chat layer costs per step: rendering 8 ChatML dialogs of about
//! 256 tokens with the model's template and tokenizing them (the ChatML
//! fixture's template and tokenizer), and masking them.
//!
//!     cargo bench -p herd-engine --bench lora_smollm
//!     python engine/benches/lora_1b_peer.py 2 smollm    # PyTorch + PEFT, same shape and threads

use std::time::Instant;

use herd_engine::chat::Message;
use herd_engine::config::LlamaConfig;
use herd_engine::lora::{LoraConfig, PROJECTIONS};
use herd_engine::Llama;

mod common;

const BATCH: usize = 8;
const SEQ: usize = 256;

fn main() {
    herd_engine::device::tune_allocator();
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        herd_engine::device::set_cpu_threads(2);
    }
    let cfg = LlamaConfig::from_json(
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "tie_word_embeddings": true
        }),
        "SmolLM-135M shape",
    )
    .unwrap();
    let device = herd_engine::device::bench_device();
    let t0 = Instant::now();
    let mut model = Llama::init(cfg.clone(), 0, &device).unwrap();
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        targets: PROJECTIONS.iter().map(|p| p.0).collect(),
        rslora: false,
        dropout: 0.0,
        score: false,
    };
    herd_engine::checkpoint::attach_new_adapter(&mut model, lora, 1).unwrap();
    model.freeze_base(true);
    let trainable: usize = model
        .trainable_params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    println!(
        "threads={} params={} trainable={trainable} init {:.1} s",
        herd_engine::device::cpu_threads(),
        model.num_params(),
        t0.elapsed().as_secs_f64()
    );
    herd_engine::device::reset_peak_rss();
    let seqs = common::random_rows(BATCH, SEQ, cfg.vocab_size);
    let step = common::median_step(&model, &seqs);
    let peak = herd_engine::device::peak_rss_mib();

    // The chat layer's share: 8 multi-turn ChatML dialogs of ~256 tokens.
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families/chatml");
    let chat = herd_engine::checkpoint::load_chat(&fixture).unwrap();
    let dialogs: Vec<Vec<Message>> = (0..BATCH)
        .map(|i| {
            let mut d = vec![Message::new("system", "You are a helpful assistant. Answer briefly and accurately.")];
            for turn in 0..3 {
                d.push(Message::new("user", &format!("Question {i}.{turn}: what is the capital of France, and why is it Paris?")));
                d.push(Message::new("assistant", &format!("Answer {i}.{turn}: the capital of France is Paris. Sure! Here is a summary of the article in three sentences.")));
            }
            d
        })
        .collect();
    let mut tokens = 0;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        tokens = 0;
        for d in &dialogs {
            tokens += chat.encode_dialog(d).unwrap().len();
        }
    }
    let chat_s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "lora_smollm f32 (batch {BATCH} x {SEQ}, r16 all-linear, base frozen): {step:.2} s/step median, {:.0} tokens/s, peak RSS {peak:.0} MiB (steps); templates + tokenization of a batch ({} tokens): {:.2} ms = {:.3}% of a step",
        (BATCH * SEQ) as f64 / step,
        tokens,
        chat_s * 1e3,
        100.0 * chat_s / step
    );
}
