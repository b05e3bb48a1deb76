//! One LoRA SFT step on a Llama-3.2-1B-shaped model (vocab 128256, hidden
//! 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, tied
//! embeddings), random init in memory (no download), batch 1 × 512, LoRA
//! rank 16, alpha 32 on all seven projections, base frozen, AdamW on the
//! adapter: step time (median of 3 after a warm-up) and peak RSS.
//!
//!     cargo bench -p herd-engine --bench lora_1b
//!     python engine/benches/lora_1b_peer.py 2     # PyTorch + PEFT, same shape and threads
//!
//! f32 only so far (bf16 and activation checkpointing are not built yet).

use std::time::Instant;

use candle_core::Device;
use herd_engine::chat::Encoded;
use herd_engine::config::LlamaConfig;
use herd_engine::lora::{Lora, LoraConfig, PROJECTIONS};
use herd_engine::objective;
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use herd_engine::Llama;

/// Llama 3.2 1B's shape.
pub fn shape() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "tie_word_embeddings": true
    })
}

fn main() {
    herd_engine::device::tune_allocator();
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        herd_engine::device::set_cpu_threads(2);
    }
    let cfg = LlamaConfig::from_json(&shape(), "Llama-3.2-1B shape").unwrap();
    let t0 = Instant::now();
    let mut model = Llama::init(cfg.clone(), 0, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        targets: PROJECTIONS.iter().map(|p| p.0).collect(),
        rslora: false,
        dropout: 0.0,
        score: false,
    };
    let adapter = Lora::init(
        lora,
        cfg.num_hidden_layers,
        |l, p| model.projection_shape(l, p),
        1,
        &Device::Cpu,
    )
    .unwrap();
    model.lora = Some(adapter);
    model.freeze_base(true);
    let trainable: usize = model
        .trainable_params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    println!(
        "threads={} params={} trainable={trainable} init {:.1} s, RSS after init {:.0} MiB",
        herd_engine::device::cpu_threads(),
        model.num_params(),
        t0.elapsed().as_secs_f64(),
        herd_engine::device::peak_rss_mib()
    );
    let mut rng = Rng::new(0);
    let seq = Encoded {
        ids: (0..512).map(|_| rng.below(cfg.vocab_size) as u32).collect(),
        target_mask: vec![1; 512],
        format_mask: vec![0; 512],
    };
    let mut trainer = Trainer::new(
        model.trainable_params(),
        TrainConfig {
            lr: 1e-4,
            steps: 100,
            ..Default::default()
        },
    )
    .unwrap();
    let mut times = vec![];
    for i in 0..4 {
        let t = Instant::now();
        trainer
            .step(|_| Ok(objective::sft_loss(&model, std::slice::from_ref(&seq), 0)?.0))
            .unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("step {i}: {s:.2} s");
        if i > 0 {
            times.push(s);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "lora_1b f32 (batch 1 x 512, r16 all-linear, base frozen): {:.2} s/step median, {:.0} tokens/s, peak RSS {:.0} MiB",
        times[1],
        512.0 / times[1],
        herd_engine::device::peak_rss_mib()
    );
}
