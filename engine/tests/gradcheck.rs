//! Every parameter kind's gradient against central finite differences, in
//! f64, on models the test builds: untied LM with Llama 3 RoPE scaling (SFT),
//! tied LM (DPO with format masking, shared-prompt packing), reward model
//! (packed Bradley-Terry). Catches any op whose backward is missing or wrong.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use herd_engine::chat::Encoded;
use herd_engine::config::{Llama3RopeScaling, LlamaConfig, RopeScaling};
use herd_engine::objective::{self, Pair, Ranked};
use herd_engine::optim::gradients;
use herd_engine::Llama;

fn config(tie: bool, labels: usize, scaling: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 29,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: scaling.then_some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        })),
        max_position_embeddings: 64,
        tie_word_embeddings: tie,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        pad_token_id: Some(2),
        dtype: "float32".into(),
        num_labels: labels,
        arch: Default::default(),
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
    }
}

fn model_f64(cfg: LlamaConfig, seed: u64) -> Llama {
    let m = Llama::init(cfg.clone(), seed, &Device::Cpu).unwrap();
    // Norm gains away from 1 so their gradients are not special.
    let mut t: BTreeMap<String, Tensor> = m.tensors();
    let mut rng = herd_engine::rng::Rng::new(seed + 1);
    for v in t.values_mut() {
        let n = v.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| 0.3 * rng.normal()).collect();
        *v = (v.clone() + Tensor::from_vec(noise, v.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    Llama::from_tensors_dtype(cfg, t, &Device::Cpu, DType::F64).unwrap()
}

fn enc(prompt: &[u32], completion: &[u32], fmt_last: bool) -> Encoded {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(completion);
    let mut target = vec![0u8; prompt.len()];
    target.extend(std::iter::repeat_n(1, completion.len()));
    let mut format = vec![0u8; ids.len()];
    format[0] = 1;
    if fmt_last {
        *format.last_mut().unwrap() = 1;
    }
    Encoded {
        ids,
        target_mask: target,
        format_mask: format,
    }
}

fn check(model: &Llama, loss_fn: &dyn Fn(&Llama) -> Tensor, what: &str) {
    let params = model.params();
    let loss = loss_fn(model);
    let grads = gradients(&loss, &params).unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    let mut bad = vec![];
    for ((name, var), grad) in params.iter().zip(&grads) {
        let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for &k in &[0, n / 3, n / 2 + 1, n - 1] {
            let probe = |delta: f64| {
                let mut w = base.clone();
                w[k] += delta;
                var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_fn(model).to_scalar::<f64>().unwrap()
            };
            let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let analytic = g[k];
            if (numeric - analytic).abs() > 1e-6 + 1e-4 * numeric.abs().max(analytic.abs()) {
                bad.push(format!(
                    "{what}: d loss / d {name}[{k}]: analytic {analytic}, numeric {numeric}"
                ));
            }
            checked += 1;
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {checked} gradient probes disagree:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(checked >= 4 * 11, "{what}: only {checked} probes");
}

#[test]
fn sft_gradients_untied_with_llama3_rope_scaling() {
    let model = model_f64(config(false, 0, true), 1);
    let seqs = vec![
        enc(&[0, 5, 6, 7], &[8, 9, 10, 1], true),
        enc(&[0, 11, 12], &[13, 14, 1], true),
    ];
    check(
        &model,
        &|m| objective::sft_loss(m, &seqs, 2).unwrap().0,
        "sft",
    );
    // Packed rows (block-diagonal attention, restarted positions) too.
    check(
        &model,
        &|m| objective::sft_loss_packed(m, &seqs, 2, 32).unwrap().0,
        "packed sft",
    );
}

#[test]
fn dpo_gradients_tied_embeddings_masked_shared_prompt() {
    let model = model_f64(config(true, 0, false), 2);
    let reference = model_f64(config(true, 0, false), 3);
    let pairs = vec![
        Pair {
            chosen: enc(&[0, 5, 6], &[7, 8, 1], true),
            rejected: enc(&[0, 5, 6], &[9, 1], true),
        },
        Pair {
            chosen: enc(&[0, 11], &[12, 13, 14, 1], true),
            rejected: enc(&[0, 11], &[15, 16, 1], true),
        },
    ];
    let (rc, rr) = objective::reference_logps(&reference, &pairs, true, true, 2).unwrap();
    check(
        &model,
        &|m| {
            objective::dpo_loss(m, &pairs, &rc, &rr, 0.1, 0.2, true, 2)
                .unwrap()
                .loss
        },
        "dpo",
    );
}

#[test]
fn reward_model_gradients_packed() {
    let model = model_f64(config(false, 1, false), 4);
    let examples = vec![
        Ranked {
            prompt: vec![0, 5, 6],
            responses: vec![vec![7, 8, 1], vec![9, 1], vec![10, 11, 12, 1]],
            margin: 0.0,
        },
        Ranked {
            prompt: vec![0, 13],
            responses: vec![vec![14, 1], vec![15, 16, 1]],
            margin: 0.5,
        },
    ];
    let orders = vec![vec![2, 0, 1], vec![1, 0]];
    check(
        &model,
        &|m| {
            objective::rm_loss(m, &examples, true, Some(&orders), 2)
                .unwrap()
                .0
                .loss
        },
        "rm",
    );
}

/// The fused f32 CPU kernels (attention softmax, target log-probs, RMSNorm,
/// RoPE, the few-row linear) against the plain differentiable path in f64:
/// values and every parameter's gradient.
#[test]
fn fused_kernels_match_the_plain_path() {
    let m64 = model_f64(config(false, 0, true), 9);
    let m32 = Llama::from_tensors(m64.config.clone(), m64.tensors(), &Device::Cpu).unwrap();
    let two = vec![
        enc(&[0, 5, 6, 7], &[8, 9, 10, 1], true),
        enc(&[0, 11, 12], &[13, 14, 1], true),
    ];
    // One row of 6 tokens: every projection has <= FEW_ROWS rows.
    let short = vec![enc(&[0, 11, 12], &[13, 14, 1], true)];
    assert!(short[0].ids.len() <= herd_engine::fused::FEW_ROWS);
    for seqs in [two, short] {
        let (l64, _) = objective::sft_loss_packed(&m64, &seqs, 2, 32).unwrap();
        let (l32, _) = objective::sft_loss_packed(&m32, &seqs, 2, 32).unwrap();
        let (v64, v32) = (
            l64.to_scalar::<f64>().unwrap(),
            l32.to_scalar::<f32>().unwrap() as f64,
        );
        assert!((v64 - v32).abs() < 1e-4 * v64.abs(), "loss {v32} vs {v64}");
        let g64 = gradients(&l64, &m64.params()).unwrap();
        let g32 = gradients(&l32, &m32.params()).unwrap();
        for (((name, _), a), b) in m64.params().iter().zip(&g64).zip(&g32) {
            let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            let scale = a.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-6);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - *y as f64).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-3 * scale,
                "{name} ({} rows): max abs diff {worst} (scale {scale})",
                seqs.len()
            );
        }
    }
}

/// The few-row linear equals a plain matmul for every row count up to
/// FEW_ROWS, odd widths (a tail after the 8-wide chunks) included.
#[test]
fn few_row_linear_matches_matmul() {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (1, 8, 3),
        (3, 37, 5),
        (4, 256, 17),
        (8, 13, 64),
        (5, 300, 2),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let fast: Vec<f32> = herd_engine::fused::linear_few_rows(&x, &w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let x64 = x.to_dtype(candle_core::DType::F64).unwrap();
        let w64 = w.to_dtype(candle_core::DType::F64).unwrap();
        let plain: Vec<f64> = x64
            .matmul(&w64.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in fast.iter().zip(&plain) {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{m}x{k} @ {n}: {a} vs {b}"
            );
        }
    }
}

/// Gradients of `loss_fn` for every trainable parameter, with activation
/// checkpointing on or off.
fn grads_with(
    model: &Llama,
    loss_fn: &dyn Fn(&Llama) -> Tensor,
    checkpointing: bool,
) -> Vec<Vec<f64>> {
    model.set_checkpointing(checkpointing);
    let params = model.trainable_params();
    let mut store = loss_fn(model).backward().unwrap();
    model.finish_backward(&mut store).unwrap();
    model.set_checkpointing(false);
    herd_engine::optim::gradients_of(&store, &params)
        .unwrap()
        .iter()
        .map(|g| {
            g.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

fn assert_same_grads(model: &Llama, loss_fn: &dyn Fn(&Llama) -> Tensor, what: &str) {
    let plain = grads_with(model, loss_fn, false);
    let recomputed = grads_with(model, loss_fn, true);
    let names = model.trainable_params();
    for ((name, _), (a, b)) in names.iter().zip(plain.iter().zip(&recomputed)) {
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 + 1e-5 * x.abs(),
                "{what}: {name}[{k}]: {x} without checkpointing, {y} with"
            );
        }
    }
}

/// Activation checkpointing recomputes each block in backward: the
/// gradients are those without it, for full fine-tuning (f32 on the fused
/// kernels and f64 on the plain path; tied embeddings get their two shares)
/// and for a LoRA adapter with dropout (the recomputation replays the
/// masks).
#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let seqs = vec![
        enc(&[0, 5, 6, 7], &[8, 9, 10, 1], true),
        enc(&[0, 11, 12], &[13, 14, 1], true),
    ];
    for tie in [false, true] {
        let m64 = model_f64(config(tie, 0, true), 21);
        let m32 = Llama::from_tensors(m64.config.clone(), m64.tensors(), &Device::Cpu).unwrap();
        for (m, dtype) in [(&m64, "f64"), (&m32, "f32")] {
            assert_same_grads(
                m,
                &|m| objective::sft_loss(m, &seqs, 2).unwrap().0,
                &format!("sft tied={tie} {dtype}"),
            );
        }
    }
    let pairs = vec![Pair {
        chosen: enc(&[0, 5, 6], &[7, 8, 1], true),
        rejected: enc(&[0, 5, 6], &[9, 1], true),
    }];
    let m = model_f64(config(true, 0, false), 22);
    let (rc, rr) = objective::reference_logps(&m, &pairs, true, true, 2).unwrap();
    assert_same_grads(
        &m,
        &|m| {
            objective::dpo_loss(m, &pairs, &rc, &rr, 0.1, 0.2, true, 2)
                .unwrap()
                .loss
        },
        "dpo",
    );
    let rm = model_f64(config(false, 1, false), 23);
    let examples = vec![Ranked {
        prompt: vec![0, 5, 6],
        responses: vec![vec![7, 8, 1], vec![9, 1], vec![10, 11, 12, 1]],
        margin: 0.0,
    }];
    assert_same_grads(
        &rm,
        &|m| {
            objective::rm_loss(m, &examples, true, None, 2)
                .unwrap()
                .0
                .loss
        },
        "rm",
    );

    // LoRA on a frozen f32 base, dropout on: each pass draws its masks from
    // the same seeded stream.
    let mut lm = Llama::init(config(false, 0, false), 24, &Device::Cpu).unwrap();
    let lora = herd_engine::lora::LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: herd_engine::lora::PROJECTIONS.iter().map(|p| p.0).collect(),
        rslora: false,
        dropout: 0.3,
        score: false,
    };
    herd_engine::checkpoint::attach_new_adapter(&mut lm, lora, 5).unwrap();
    // B starts at zero; give it values so A gets a gradient too.
    for (_, (_, b)) in lm.lora.as_ref().unwrap().adapters.iter() {
        let n = b.elem_count();
        let v: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.01).collect();
        b.set(&Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    lm.freeze_base(true);
    let adapter = lm.lora.as_ref().unwrap();
    let loss = |m: &Llama| {
        m.lora.as_ref().unwrap().set_training(true, 99);
        objective::sft_loss(m, &seqs, 2).unwrap().0
    };
    assert_same_grads(&lm, &loss, "lora with dropout");
    // And the masks matter: without dropout the gradients differ.
    let with_dropout = grads_with(&lm, &loss, false);
    adapter.set_training(false, 0);
    let without = grads_with(&lm, &|m| objective::sft_loss(m, &seqs, 2).unwrap().0, false);
    assert_ne!(with_dropout, without);
}

/// What a training job checks before saving: the first parameter holding a
/// NaN or an infinity is named; huge but finite weights are not flagged.
#[test]
fn the_first_non_finite_parameter_is_named() {
    use candle_core::{Tensor, Var};
    let dev = candle_core::Device::Cpu;
    let var = |v: Vec<f32>| Var::from_tensor(&Tensor::new(v.as_slice(), &dev).unwrap()).unwrap();
    let fine = vec![
        ("a".to_string(), var(vec![1.0, -2.0])),
        ("b".to_string(), var(vec![3e38, 3e38, 3e38])),
    ];
    assert_eq!(herd_engine::optim::first_non_finite(&fine).unwrap(), None);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut params = fine.clone();
        params.push(("c".to_string(), var(vec![0.0, bad])));
        assert_eq!(
            herd_engine::optim::first_non_finite(&params).unwrap(),
            Some("c".into())
        );
    }
}
