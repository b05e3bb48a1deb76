//! LoRA against PEFT: `tests/fixtures/llama-tiny/lora` holds a PEFT adapter
//! on the `ref` model and what PyTorch + PEFT computed with it (see
//! `tests/fixtures/README.md`): logits, SFT loss and the gradients of A and
//! B, DPO with the adapter switched off as the reference, one AdamW step on
//! the adapter only, and the merged weights.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::*;
use herd_engine::chat::Encoded;
use herd_engine::checkpoint::{load_adapter, load_model, save_adapter};
use herd_engine::objective;
use herd_engine::optim::{global_norm, gradients, AdamW, AdamWConfig};
use herd_engine::Llama;
use serde_json::Value;

fn lora_expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/expected.json")).unwrap())
        .unwrap()
}

fn with_adapter() -> Llama {
    let mut m = load_model(&fixtures().join("ref"), &device()).unwrap();
    load_adapter(&mut m, &fixtures().join("lora/adapter")).unwrap();
    m
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let ids = Tensor::new(ids, &device()).unwrap().unsqueeze(0).unwrap();
    m.forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check_grads(grads: &BTreeMap<String, Tensor>, want: &Value, what: &str) {
    for (name, w) in want.as_object().unwrap() {
        let got: Vec<f32> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
        close_all(&got, &flat(w), &format!("{what} grad {name}"));
    }
}

fn sft_sequences() -> Vec<Encoded> {
    expected()["sft"]["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(seq)
        .collect()
}

#[test]
fn lora_forward_sft_step_and_merge_match_peft() {
    let e = lora_expected();
    let m = with_adapter();
    let lora = m.lora.as_ref().unwrap();
    assert_eq!(lora.config.rank, e["rank"].as_u64().unwrap() as usize);
    assert_eq!(lora.config.scale(), e["scale"].as_f64().unwrap());
    let trainable: usize = lora.params().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(
        trainable as u64,
        e["sft"]["trainable_parameters"].as_u64().unwrap()
    );

    // Logits with the adapter on; off, they are the base's.
    let fwd = ids(&e["forward"]["ids"]);
    close_all(
        &logits(&m, &fwd),
        &flat(&e["forward"]["logits"]),
        "logits with adapter",
    );
    lora.set_enabled(false);
    let base = load_model(&fixtures().join("ref"), &device()).unwrap();
    assert_eq!(
        logits(&m, &fwd),
        logits(&base, &fwd),
        "adapter off = the base"
    );
    lora.set_enabled(true);

    // SFT loss and the gradients of A and B.
    let seqs = sft_sequences();
    let (loss, _) = objective::sft_loss(&m, &seqs, 319).unwrap();
    close(
        loss.to_scalar::<f32>().unwrap() as f64,
        e["sft"]["loss"].as_f64().unwrap(),
        "sft loss",
    );
    let params = lora.params();
    let grads = gradients(&loss, &params).unwrap();
    close(
        global_norm(&grads).unwrap(),
        e["sft"]["grad_norm"].as_f64().unwrap(),
        "sft grad norm",
    );
    let by_name: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(n, _)| n.clone())
        .zip(grads.clone())
        .collect();
    check_grads(&by_name, &e["sft"]["grads"], "sft");

    // One AdamW step on the adapter only; the base does not move.
    let s = &e["step"];
    let betas = flat(&s["betas"]);
    let cfg = AdamWConfig {
        lr: s["lr"].as_f64().unwrap(),
        beta1: betas[0],
        beta2: betas[1],
        eps: s["eps"].as_f64().unwrap(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
    };
    let base_q: Vec<f32> = m.layers[0].q_proj.flatten_all().unwrap().to_vec1().unwrap();
    let mut opt = AdamW::new(params, cfg).unwrap();
    opt.step(&grads, cfg.lr).unwrap();
    let (after, _) = objective::sft_loss(&m, &seqs, 319).unwrap();
    close(
        after.to_scalar::<f32>().unwrap() as f64,
        s["sft_loss_after"].as_f64().unwrap(),
        "sft loss after one step",
    );
    assert_eq!(
        m.layers[0]
            .q_proj
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        base_q
    );

    // Merged after the step: W + scale·B·A, and the merged model computes
    // what the adapter model computes.
    let merged = m.merged_tensors().unwrap();
    let name = e["merged"]["tensor"].as_str().unwrap();
    let w: Vec<f32> = merged[name].flatten_all().unwrap().to_vec1().unwrap();
    close_all(&w, &flat(&e["merged"]["weight"]), "merged weight");
    let plain = Llama::from_tensors(m.config.clone(), merged, &device()).unwrap();
    let want = flat(&e["merged"]["logits_after_step"]);
    close_all(&logits(&m, &fwd), &want, "adapter logits after the step");
    close_all(&logits(&plain, &fwd), &want, "merged logits");
}

#[test]
fn lora_dpo_with_the_adapter_off_as_reference_matches_peft() {
    let e = lora_expected();
    let d = &e["dpo"];
    let m = with_adapter();
    let lora = m.lora.as_ref().unwrap();
    let pairs = dpo_pairs();
    let mask_format = d["mask_format_tokens"].as_bool().unwrap();
    for share in [false, true] {
        // The reference: the same weights with the adapter switched off.
        lora.set_enabled(false);
        let (rc, rr) = objective::reference_logps(&m, &pairs, mask_format, share, 319).unwrap();
        lora.set_enabled(true);
        check_dpo_step(
            &m,
            &pairs,
            (&rc, &rr),
            (d["beta"].as_f64().unwrap(), d["alpha"].as_f64().unwrap()),
            mask_format,
            share,
            &lora.params(),
            d,
            &format!("lora dpo (share_prompt={share})"),
        );
    }
}

/// The adapter directory round-trips: PEFT's names and shapes out, the
/// same numbers back in; adapters PEFT could write but herd does not
/// compute are refused by field.
#[test]
fn adapter_directories_round_trip_and_unsupported_ones_are_refused() {
    let m = with_adapter();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, dir.path(), "ref").unwrap();
    let names = |d: &std::path::Path| -> BTreeMap<String, Vec<usize>> {
        herd_engine::lora::load_tensors(d)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect()
    };
    assert_eq!(names(dir.path()), names(&fixtures().join("lora/adapter")));
    let mut back = load_model(&fixtures().join("ref"), &device()).unwrap();
    load_adapter(&mut back, dir.path()).unwrap();
    let fwd = ids(&lora_expected()["forward"]["ids"]);
    assert_eq!(logits(&back, &fwd), logits(&m, &fwd));

    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("all")),
        ("target_modules", serde_json::json!(["lm_head"])),
        ("modules_to_save", serde_json::json!(["score"])),
    ] {
        let bad = tempfile::tempdir().unwrap();
        let mut c = config.clone();
        c[field] = value;
        std::fs::write(bad.path().join("adapter_config.json"), c.to_string()).unwrap();
        std::fs::copy(
            fixtures().join("lora/adapter/adapter_model.safetensors"),
            bad.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut model = load_model(&fixtures().join("ref"), &device()).unwrap();
        let err = load_adapter(&mut model, bad.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
}

/// With the base frozen, backward computes gradients for the adapter only
/// (the same ones: the fixture's), and none for the base weights; a reward
/// model's score head stays trainable beside its adapter.
#[test]
fn a_frozen_base_takes_no_gradient() {
    let e = lora_expected();
    let mut m = with_adapter();
    m.freeze_base(true);
    let trainable = m.trainable_params();
    let lora_names: Vec<String> = m
        .lora
        .as_ref()
        .unwrap()
        .params()
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        trainable.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        lora_names
    );
    let (loss, _) = objective::sft_loss(&m, &sft_sequences(), 319).unwrap();
    close(
        loss.to_scalar::<f32>().unwrap() as f64,
        e["sft"]["loss"].as_f64().unwrap(),
        "frozen sft loss",
    );
    let store = loss.backward().unwrap();
    for (name, v) in m.params() {
        assert!(store.get(v.as_tensor()).is_none(), "{name} took a gradient");
    }
    let grads: BTreeMap<String, Tensor> = trainable
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                store.get(v.as_tensor()).expect("adapter gradient").clone(),
            )
        })
        .collect();
    check_grads(&grads, &e["sft"]["grads"], "frozen sft");

    let mut rm =
        herd_engine::checkpoint::load_as_reward_model(&fixtures().join("ref"), &device(), 0)
            .unwrap();
    load_adapter(&mut rm, &fixtures().join("lora/adapter")).unwrap();
    rm.freeze_base(true);
    assert!(rm
        .trainable_params()
        .iter()
        .any(|(n, _)| n == "score.weight"));
}

/// bf16 against the f32 reference on the fixtures: the losses within 1% for
/// LoRA on a bf16 base and for full fine-tuning over f32 master weights,
/// the adapter's gradient within 5% in norm and 0.99 in cosine; and an update far below bf16's
/// resolution is kept by the f32 master weights (a bf16 weight loses it).
#[test]
fn bf16_stays_within_tolerance_and_keeps_small_updates() {
    let e = lora_expected();
    let seqs = sft_sequences();
    let tol = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= 0.01 * want.abs(),
            "{what}: bf16 {got} vs f32 {want} (tolerance 1%)"
        )
    };
    // LoRA: bf16 frozen base, f32 adapter.
    let mut m = with_adapter();
    m.freeze_base(true);
    m.compute_in_bf16().unwrap();
    assert_eq!(
        m.embed_tokens.dtype(),
        candle_core::DType::BF16,
        "the frozen base is stored in bf16"
    );
    let (loss, _) = objective::sft_loss(&m, &seqs, 319).unwrap();
    tol(
        loss.to_scalar::<f32>().unwrap() as f64,
        e["sft"]["loss"].as_f64().unwrap(),
        "lora sft loss",
    );
    let params = m.trainable_params();
    let grads = gradients(&loss, &params).unwrap();
    assert!(grads.iter().all(|g| g.dtype() == candle_core::DType::F32));
    // Gradients are noisier than the loss in bf16: their norm within 5%,
    // their direction (cosine with f32's) above 0.99.
    let norm = global_norm(&grads).unwrap();
    let want_norm = e["sft"]["grad_norm"].as_f64().unwrap();
    assert!(
        (norm - want_norm).abs() <= 0.05 * want_norm,
        "lora grad norm: bf16 {norm} vs f32 {want_norm}"
    );
    let reference = with_adapter();
    let (ref_loss, _) = objective::sft_loss(&reference, &seqs, 319).unwrap();
    let ref_grads = gradients(&ref_loss, &reference.lora.as_ref().unwrap().params()).unwrap();
    let flat_all = |g: &[Tensor]| -> Vec<f64> {
        g.iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(|x| x as f64)
            .collect()
    };
    let (a, b) = (flat_all(&grads), flat_all(&ref_grads));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norms =
        a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        dot / norms > 0.99,
        "lora gradient direction: cosine {} with f32's",
        dot / norms
    );
    let pairs = dpo_pairs();
    let lora = m.lora.as_ref().unwrap();
    lora.set_enabled(false);
    let (rc, rr) = objective::reference_logps(&m, &pairs, true, true, 319).unwrap();
    lora.set_enabled(true);
    let out = objective::dpo_loss(&m, &pairs, &rc, &rr, 0.1, 0.2, true, 319).unwrap();
    tol(
        out.loss.to_scalar::<f32>().unwrap() as f64,
        e["dpo"]["loss"].as_f64().unwrap(),
        "lora dpo loss",
    );

    // Full fine-tuning in bf16: f32 masters, cast where used.
    let f32_model = load_model(&fixtures().join("ref"), &device()).unwrap();
    let (want, _) = objective::sft_loss(&f32_model, &seqs, 319).unwrap();
    let mut full = load_model(&fixtures().join("ref"), &device()).unwrap();
    full.compute_in_bf16().unwrap();
    assert_eq!(
        full.embed_tokens.dtype(),
        candle_core::DType::F32,
        "masters stay f32"
    );
    let (loss, _) = objective::sft_loss(&full, &seqs, 319).unwrap();
    tol(
        loss.to_scalar::<f32>().unwrap() as f64,
        want.to_scalar::<f32>().unwrap() as f64,
        "full sft loss",
    );
    // One AdamW step at lr 1e-6: every weight moves by about 1e-6, far
    // below bf16's spacing near these weights (~2^-8 relative).
    let params = full.trainable_params();
    let grads = gradients(&loss, &params).unwrap();
    let (name, w) = params
        .iter()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    let before: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let mut opt = AdamW::new(
        params.clone(),
        AdamWConfig {
            lr: 1e-6,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    opt.step(&grads, 1e-6).unwrap();
    let after: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(
        moved * 10 >= before.len() * 9,
        "{name}: only {moved} of {} weights moved",
        before.len()
    );
    let bf = |v: &[f32]| -> Vec<f32> {
        Tensor::new(v, &device())
            .unwrap()
            .to_dtype(candle_core::DType::BF16)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let lost = bf(&before)
        .iter()
        .zip(&bf(&after))
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        lost * 10 >= before.len() * 9,
        "stored in bf16, the update would have been lost ({lost} of {})",
        before.len()
    );
}

/// `dtype=bf16` on the CPU: the frozen base stored in bf16, arithmetic in
/// f32 (the projections widen their weight inside the product). That is
/// exactly an f32 model whose weights were rounded to bf16: same loss, same
/// adapter gradients; and the base takes half the memory.
#[test]
fn a_bf16_stored_base_computes_as_its_rounded_f32_weights() {
    let seqs = sft_sequences();
    let mut stored = with_adapter();
    stored.freeze_base(true);
    let before: usize = stored
        .params()
        .iter()
        .map(|(_, v)| v.elem_count() * 4)
        .sum();
    stored.store_frozen_base_in_bf16().unwrap();
    let after: usize = stored
        .params()
        .iter()
        .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
        .sum();
    assert_eq!(after * 2, before, "the base takes half the bytes");
    assert_eq!(stored.compute_dtype(), candle_core::DType::F32);

    let rounded: BTreeMap<String, Tensor> = stored
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(candle_core::DType::F32).unwrap()))
        .collect();
    let mut plain = Llama::from_tensors(stored.config.clone(), rounded, &device()).unwrap();
    load_adapter(&mut plain, &fixtures().join("lora/adapter")).unwrap();
    plain.freeze_base(true);

    let run = |m: &Llama| {
        let (loss, _) = objective::sft_loss(m, &seqs, 319).unwrap();
        let grads = gradients(&loss, &m.trainable_params()).unwrap();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let ((l1, g1), (l2, g2)) = (run(&stored), run(&plain));
    assert!((l1 - l2).abs() <= 1e-5 * l2.abs(), "loss {l1} vs {l2}");
    for (a, b) in g1.iter().zip(&g2) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = b
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x as f64)
            .collect();
        close_all(&a, &b, "adapter gradient over a bf16-stored base");
    }
    // Full fine-tuning keeps f32 masters: storing its base in bf16 is refused.
    let full = load_model(&fixtures().join("ref"), &device());
    assert!(full.unwrap().store_frozen_base_in_bf16().is_err());
}
