//! The engine against PyTorch/transformers/TRL reference values
//! (`tests/fixtures/llama-tiny/expected.json`; how each value was computed: tests/fixtures/README.md).

mod common;

use candle_core::Tensor;
use common::*;
use herd_engine::chat::{Encoded, Message};
use herd_engine::checkpoint::{load_chat, load_model, load_tensors};
use herd_engine::generate::{generate, SamplingConfig};
use herd_engine::objective::{self, Ranked};
use herd_engine::optim::{AdamW, AdamWConfig};

#[test]
fn chat_format_ids_and_masks() {
    let e = expected();
    let chat = load_chat(&fixtures().join("ref")).unwrap();
    let dialog: Vec<Message> = serde_json::from_value(e["chat"]["dialog"].clone()).unwrap();
    let enc = chat.encode_dialog(&dialog).unwrap();
    assert_eq!(enc.ids, ids(&e["chat"]["ids"]));
    assert_eq!(enc.format_mask, mask(&e["chat"]["format_mask"]));
    assert_eq!(enc.target_mask, mask(&e["chat"]["target_mask"]));
    let prompt = chat.encode_prompt(&dialog[..2]).unwrap();
    assert_eq!(prompt.ids, ids(&e["chat"]["generation_prompt_ids"]));
    for (name, id) in e["chat"]["special_ids"].as_object().unwrap() {
        assert_eq!(
            chat.tokenizer.token_to_id(name),
            Some(id.as_u64().unwrap() as u32),
            "{name}"
        );
    }
    // Decoding drops specials and returns the text.
    let (_, answer) = chat
        .encode_exchange(&dialog[..2], &["The answer is 42."])
        .unwrap();
    assert_eq!(chat.decode(&answer[0].ids).unwrap(), "The answer is 42.");
}

#[test]
fn forward_logits() {
    let e = expected();
    let model = load_model(&fixtures().join("ref"), &device()).unwrap();
    let input = ids(&e["forward"]["ids"]);
    let logits = model
        .forward(
            &Tensor::new(input.as_slice(), &device())
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap();
    let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    close_all(&got, &flat(&e["forward"]["logits"]), "logits");
}

#[test]
fn greedy_generation() {
    let e = expected();
    let model = load_model(&fixtures().join("ref"), &device()).unwrap();
    let prompt = ids(&e["generate"]["prompt_ids"]);
    let out = generate(
        &model,
        &[prompt.clone()],
        &SamplingConfig::greedy(12, vec![]),
        319,
    )
    .unwrap();
    assert_eq!(out[0], ids(&e["generate"]["greedy_ids"]));
    // Batched with a shorter prompt (left padding) gives the same row.
    let out = generate(
        &model,
        &[prompt[..10].to_vec(), prompt.clone()],
        &SamplingConfig::greedy(12, vec![]),
        319,
    )
    .unwrap();
    assert_eq!(out[1], ids(&e["generate"]["greedy_ids"]));
}

#[test]
fn sft_loss() {
    let e = expected();
    let model = load_model(&fixtures().join("ref"), &device()).unwrap();
    let seqs: Vec<Encoded> = e["sft"]["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(seq)
        .collect();
    let (loss, tokens) = objective::sft_loss(&model, &seqs, 319).unwrap();
    assert_eq!(tokens as u64, e["sft"]["tokens"].as_u64().unwrap());
    close(
        loss.to_scalar::<f32>().unwrap() as f64,
        e["sft"]["loss"].as_f64().unwrap(),
        "sft loss",
    );
    // Packing all three into one row gives the same loss.
    let (packed, _) = objective::sft_loss_packed(&model, &seqs, 319, 512).unwrap();
    close(
        packed.to_scalar::<f32>().unwrap() as f64,
        e["sft"]["loss"].as_f64().unwrap(),
        "packed sft loss",
    );
}

fn dpo_case(key: &str, mask_format: bool) {
    let e = expected();
    let d = &e["dpo"];
    let policy = load_model(&fixtures().join("policy"), &device()).unwrap();
    let reference = load_model(&fixtures().join("ref"), &device()).unwrap();
    let pairs = dpo_pairs();
    for share in [false, true] {
        let (rc, rr) =
            objective::reference_logps(&reference, &pairs, mask_format, share, 319).unwrap();
        check_dpo_step(
            &policy,
            &pairs,
            (&rc, &rr),
            (d["beta"].as_f64().unwrap(), d["alpha"].as_f64().unwrap()),
            mask_format,
            share,
            &policy.params(),
            &d[key],
            &format!("({key}, share_prompt={share})"),
        );
    }
}

#[test]
fn dpo_unmasked() {
    dpo_case("unmasked", false);
}

#[test]
fn dpo_masked() {
    dpo_case("masked", true);
}

#[test]
fn reward_model_rewards_loss_accuracy_packed_and_not() {
    let e = expected();
    let rm = load_model(&fixtures().join("rm"), &device()).unwrap();
    let x = &e["rm"];
    let examples: Vec<Ranked> = x["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let seqs: Vec<Encoded> = row["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .map(seq)
                .collect();
            let p = objective::prompt_len(&seqs[0]);
            Ranked {
                prompt: seqs[0].ids[..p].to_vec(),
                responses: seqs.iter().map(|s| s.ids[p..].to_vec()).collect(),
                margin: 0.0,
            }
        })
        .collect();
    let want: Vec<f64> = flat(&x["rewards"]);
    let (out, rewards) = objective::rm_loss(&rm, &examples, false, None, 319).unwrap();
    close_all(
        &rewards.to_vec1::<f32>().unwrap(),
        &want,
        "rewards (unpacked)",
    );
    close(
        out.loss.to_scalar::<f32>().unwrap() as f64,
        x["loss"].as_f64().unwrap(),
        "rm loss",
    );
    assert_eq!(out.pairs as u64, x["pairs"].as_u64().unwrap());
    close(
        out.correct as f64 / out.pairs as f64,
        x["accuracy"].as_f64().unwrap(),
        "rm accuracy",
    );
    // Packed rows, responses in a shuffled order: the same rewards (1e-5).
    let orders: Vec<Vec<usize>> = examples
        .iter()
        .map(|ex| (0..ex.responses.len()).rev().collect())
        .collect();
    let (packed, _) = objective::rm_rewards(&rm, &examples, true, Some(&orders), 319).unwrap();
    let packed: Vec<f32> = packed.to_vec1().unwrap();
    for (a, b) in packed.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-5, "packed reward {a} vs {b}");
    }
}

#[test]
fn adamw_three_steps() {
    let e = expected();
    let a = &e["adamw"];
    let shape = (4usize, 5usize);
    let w0 = Tensor::from_vec(
        flat(&a["w0"]).iter().map(|x| *x as f32).collect::<Vec<_>>(),
        shape,
        &device(),
    )
    .unwrap();
    let var = candle_core::Var::from_tensor(&w0).unwrap();
    let betas = flat(&a["betas"]);
    let cfg = AdamWConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: betas[0],
        beta2: betas[1],
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
    };
    let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
    for g in a["grads"].as_array().unwrap() {
        let g = Tensor::from_vec(
            flat(g).iter().map(|x| *x as f32).collect::<Vec<_>>(),
            shape,
            &device(),
        )
        .unwrap();
        opt.step(&[g], cfg.lr).unwrap();
    }
    close_all(
        &var.flatten_all().unwrap().to_vec1().unwrap(),
        &flat(&a["w3"]),
        "adamw w3",
    );
}

#[test]
fn averaging_uniform_and_weighted() {
    let e = expected();
    let a = &e["average"];
    let name = a["tensor"].as_str().unwrap();
    let models = vec![
        load_tensors(&fixtures().join("ref")).unwrap(),
        load_tensors(&fixtures().join("policy")).unwrap(),
    ];
    let uniform = herd_engine::average::average(&models, &[]).unwrap();
    close_all(
        &uniform[name].flatten_all().unwrap().to_vec1().unwrap(),
        &flat(&a["uniform"]),
        "uniform",
    );
    let weights = flat(&a["weights"]);
    let weighted = herd_engine::average::average(&models, &weights).unwrap();
    close_all(
        &weighted[name].flatten_all().unwrap().to_vec1().unwrap(),
        &flat(&a["weighted"]),
        "weighted",
    );
    // Mismatched shapes are refused, naming the tensor.
    let mut bad = models[1].clone();
    bad.insert(
        name.to_string(),
        Tensor::zeros((2, 2), candle_core::DType::F32, &device()).unwrap(),
    );
    let err = herd_engine::average::average(&[models[0].clone(), bad], &[]).unwrap_err();
    assert!(err.to_string().contains(name), "{err}");
}
