//! One LoRA SFT step on a Llama-3.2-1B-shaped model (vocab 128256, hidden
//! 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, tied
//! embeddings), random init in memory (no download), batch 1 × 512, LoRA
//! rank 16, alpha 32 on all seven projections, base frozen, AdamW on the
//! adapter: step time (median of 3 after a warm-up) and peak RSS, of the
//! whole process and of the training steps alone.
//!
//!     cargo bench -p herd-engine --bench lora_1b -- [f32|bf16] [ckpt] [full]
//!     python engine/benches/lora_1b_peer.py 2 [f32|bf16] [ckpt]   # PyTorch + PEFT, same shape and threads
//!
//! `bf16`: the frozen base stored in bf16 (computed in bf16 on a GPU, in
//! f32 on the CPU), the adapter f32;
//! `ckpt`: activation checkpointing per block; `full`: full fine-tuning
//! instead of LoRA (every weight trains: ~20 GB of f32 weights, gradients
//! and moments before activations; for a GPU). `HERD_BENCH_DEVICE=cuda:0`
//! runs it on a GPU; `HERD_PEAK_TFLOPS` (the device's peak for the dtype)
//! adds model FLOPs utilization to the report.

use std::time::Instant;

use herd_engine::config::LlamaConfig;
use herd_engine::lora::{LoraConfig, PROJECTIONS};
use herd_engine::Llama;

mod common;

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "bf16");
    let ckpt = args.iter().any(|a| a == "ckpt");
    let full = args.iter().any(|a| a == "full");
    let device = herd_engine::device::bench_device();
    let cfg = LlamaConfig::from_json(&shape(), "Llama-3.2-1B shape").unwrap();
    let t0 = Instant::now();
    // On the CPU the seeded init (as herd builds models); on a GPU random
    // weights drawn there (the seeded init takes ~50 s on one core).
    let mut model = if device.is_cpu() {
        Llama::init(cfg.clone(), 0, &device).unwrap()
    } else {
        let tensors = herd_engine::model::param_shapes(&cfg)
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("norm.weight") {
                    candle_core::Tensor::ones(shape, candle_core::DType::F32, &device)
                } else {
                    candle_core::Tensor::randn(0f32, 0.02, shape, &device)
                };
                (name, t.unwrap())
            })
            .collect();
        Llama::from_tensors(cfg.clone(), tensors, &device).unwrap()
    };
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        targets: PROJECTIONS.iter().map(|p| p.0).collect(),
        rslora: false,
        dropout: 0.0,
        score: false,
    };
    if !full {
        herd_engine::checkpoint::attach_new_adapter(&mut model, lora, 1).unwrap();
        model.freeze_base(true);
    }
    if bf16 {
        // As a `dtype=bf16` job does: a GPU computes in bf16; the CPU has no
        // bf16 arithmetic, so there the frozen base is stored in bf16 and
        // the products widen it (full fine-tuning: bf16 compute over f32
        // masters, for the GPU).
        if device.is_cpu() && !full {
            model.store_frozen_base_in_bf16().unwrap();
        } else {
            model.compute_in_bf16().unwrap();
        }
    }
    model.set_checkpointing(ckpt);
    let trainable: usize = model
        .trainable_params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let init_peak = herd_engine::device::peak_rss_mib();
    herd_engine::device::reset_peak_rss();
    println!(
        "threads={} params={} trainable={trainable} init {:.1} s, peak RSS during init {init_peak:.0} MiB, RSS after {:.0} MiB",
        herd_engine::device::cpu_threads(),
        model.num_params(),
        t0.elapsed().as_secs_f64(),
        herd_engine::device::peak_rss_mib()
    );
    let seqs = common::random_rows(1, 512, cfg.vocab_size);
    let step = common::median_step(&model, &seqs);
    let steps_peak = herd_engine::device::peak_rss_mib();
    // Model FLOPs per token (nanoGPT's estimate): 6N + 12·L·H·Q·T for full
    // fine-tuning; a frozen base needs no weight gradients, 4N + the same
    // attention term. Recomputation is not counted (it is not model work).
    let n = model.num_params() as f64;
    let (l, h, q, t) = (
        cfg.num_hidden_layers as f64,
        cfg.num_attention_heads as f64,
        cfg.head_dim as f64,
        512.0,
    );
    let per_token = if full { 6.0 } else { 4.0 } * n + 12.0 * l * h * q * t;
    let tflops = per_token * 512.0 / step / 1e12;
    let mfu = std::env::var("HERD_PEAK_TFLOPS")
        .ok()
        .and_then(|p| p.parse::<f64>().ok())
        .map(|peak| format!(", MFU {:.1}% of {peak} TFLOP/s", 100.0 * tflops / peak))
        .unwrap_or_default();
    println!(
        "lora_1b {}{}{} on {} (batch 1 x 512{}): {:.2} s/step median, {:.0} tokens/s, {tflops:.3} model TFLOP/s{mfu}, peak RSS {:.0} MiB (steps), {:.0} MiB (process)",
        if full { "full " } else { "" },
        if bf16 { "bf16" } else { "f32" },
        if ckpt { " checkpointed" } else { "" },
        std::env::var("HERD_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
        if full { ", every weight trains" } else { ", r16 all-linear, base frozen" },
        step,
        512.0 / step,
        steps_peak,
        steps_peak.max(init_peak)
    );
}
