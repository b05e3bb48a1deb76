//! Engine throughput on the shared bench shape (engine/benches/llama-bench.json):
//! SFT step tokens/s, DPO step pair-tokens/s (reference log-probs cached,
//! prompt shared by chosen and rejected), greedy generation new tokens/s at
//! batch 4, rejection sampling's generation (K = 10 samples of each of two
//! 128-token prompts, 128 new tokens, temperature 0.8, top-p 0.95, through
//! `sample_many` as the `sample` job calls it: one prompt's samples per call)
//! new tokens/s, and peak RSS. Median of 5 timed repetitions after one
//! warm-up (3 for generation).
//!
//! Run: `cargo bench -p herd-engine --bench engine_bench` (2 threads unless
//! RAYON_NUM_THREADS is set).

use std::time::Instant;

use herd_engine::chat::Encoded;
use herd_engine::config::LlamaConfig;
use herd_engine::generate::{generate, sample_many, SamplingConfig};
use herd_engine::objective::{self, Pair};
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use herd_engine::Llama;

fn median(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

fn main() {
    herd_engine::device::tune_allocator();
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        herd_engine::device::set_cpu_threads(2);
    }
    let path =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/llama-bench.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("bench config")).unwrap();
    let b = v["bench_batch"].as_u64().unwrap() as usize;
    let t = v["bench_seq"].as_u64().unwrap() as usize;
    let obj = v.as_object_mut().unwrap();
    obj.remove("bench_batch");
    obj.remove("bench_seq");
    let cfg = LlamaConfig::from_json(&v, "llama-bench.json").unwrap();
    let vocab = cfg.vocab_size as usize;
    let dev = herd_engine::device::bench_device();
    let model = Llama::init(cfg.clone(), 0, &dev).unwrap();
    let mut rng = Rng::new(0);
    let mut rand_ids = |n: usize| (0..n).map(|_| rng.below(vocab) as u32).collect::<Vec<_>>();
    let arg = std::env::args().nth(1).unwrap_or_default();
    let run = |name: &str| arg.is_empty() || arg == "--bench" || arg.contains(name);
    println!(
        "threads={} params={} batch={b} seq={t}",
        herd_engine::device::cpu_threads(),
        model.num_params()
    );

    if run("sft") {
        // Every token after the first is a target, as torch_bench.py's SFT step.
        let seqs: Vec<Encoded> = (0..b)
            .map(|_| {
                let ids = rand_ids(t);
                Encoded {
                    target_mask: vec![1; t],
                    format_mask: vec![0; t],
                    ids,
                }
            })
            .collect();
        let mut trainer = Trainer::new(
            model.params(),
            TrainConfig {
                lr: 1e-5,
                steps: 1000,
                ..Default::default()
            },
        )
        .unwrap();
        let secs = median(
            || {
                trainer
                    .step(|_| Ok(objective::sft_loss(&model, &seqs, 0)?.0))
                    .unwrap();
            },
            5,
        );
        println!(
            "sft_step: {:.0} tokens/s ({:.3} s/step, {} tokens)",
            (b * t) as f64 / secs,
            secs,
            b * t
        );
    }
    if run("dpo") {
        // B pairs; each sequence is T tokens: a T/2 prompt shared by a T/2
        // chosen and a T/2 rejected completion. Pair-tokens = 2*B*T, as torch_bench.py.
        let half = t / 2;
        let pairs: Vec<Pair> = (0..b)
            .map(|_| {
                let prompt = rand_ids(half);
                let mk = |c: Vec<u32>| {
                    let mut ids = prompt.clone();
                    ids.extend(c);
                    let mut target = vec![0u8; half];
                    target.extend(vec![1u8; t - half]);
                    Encoded {
                        format_mask: vec![0; ids.len()],
                        target_mask: target,
                        ids,
                    }
                };
                Pair {
                    chosen: mk(rand_ids(t - half)),
                    rejected: mk(rand_ids(t - half)),
                }
            })
            .collect();
        let reference = model.deep_clone().unwrap();
        let (rc, rr) = objective::reference_logps(&reference, &pairs, true, true, 0).unwrap();
        let policy = model.deep_clone().unwrap();
        let mut trainer = Trainer::new(
            policy.params(),
            TrainConfig {
                lr: 1e-5,
                steps: 1000,
                ..Default::default()
            },
        )
        .unwrap();
        let secs = median(
            || {
                trainer
                    .step(|_| {
                        Ok(objective::dpo_loss(&policy, &pairs, &rc, &rr, 0.1, 0.2, true, 0)?.loss)
                    })
                    .unwrap();
            },
            5,
        );
        println!(
            "dpo_step (shared prompt, cached reference): {:.0} pair-tokens/s ({:.3} s/step)",
            (2 * b * t) as f64 / secs,
            secs
        );
        let secs = median(
            || {
                trainer
                    .step(|_| {
                        let l = objective::dpo_logps(&policy, &pairs, true, false, 0)?;
                        Ok(herd_engine::loss::dpo_loss(herd_engine::loss::DpoInputs {
                            policy_chosen: &l.chosen,
                            policy_rejected: &l.rejected,
                            ref_chosen: &rc,
                            ref_rejected: &rr,
                            nll_logprob_sum: &l.nll_sum,
                            nll_tokens: l.nll_tokens,
                            beta: 0.1,
                            nll_weight: 0.2,
                        })?
                        .loss)
                    })
                    .unwrap();
            },
            3,
        );
        println!(
            "dpo_step (separate rows, cached reference): {:.0} pair-tokens/s ({:.3} s/step)",
            (2 * b * t) as f64 / secs,
            secs
        );
    }
    if run("gen") {
        let prompts: Vec<Vec<u32>> = (0..4).map(|_| rand_ids(32)).collect();
        let cfg = SamplingConfig::greedy(128, vec![]);
        let secs = median(
            || {
                generate(&model, &prompts, &cfg, 0).unwrap();
            },
            3,
        );
        println!(
            "generate (batch 4, 32 prompt + 128 new, greedy): {:.0} new tokens/s",
            (4 * 128) as f64 / secs
        );
    }
    if run("sample") {
        let prompts: Vec<Vec<u32>> = (0..2).map(|_| rand_ids(128)).collect();
        let (k, new) = (10, 128);
        let cfg = SamplingConfig {
            max_new_tokens: new,
            temperature: 0.8,
            top_p: 0.95,
            seed: 1,
            stop_ids: vec![],
        };
        let secs = median(
            || {
                // As the sample job calls it (batch_size 16: one prompt's
                // 10 samples per call).
                sample_many(&model, &prompts, &[k, k], &cfg, 0, 16, &|_| {}).unwrap();
            },
            3,
        );
        println!(
            "sample (K=10 of 2 prompts, 128 prompt + 128 new, temperature 0.8, top-p 0.95): {:.0} new tokens/s",
            (2 * k * new) as f64 / secs
        );
    }
    println!("peak_rss: {:.0} MiB", herd_engine::device::peak_rss_mib());
}
