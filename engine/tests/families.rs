//! Real models' formats against transformers: for each template family
//! (Llama 3.1, its `{% generation %}` variant, SmolLM's ChatML, Llama 2,
//! Zephyr on Mistral, Qwen2), chat ids and masks, plain text, special and
//! stop tokens, logits, SFT and DPO losses and gradients, and greedy tokens
//! with the model's stop tokens (`tests/fixtures/families/make_families.py`
//! says how each value was computed).

mod common;

use std::path::PathBuf;

use candle_core::Tensor;
use common::*;
use herd_engine::chat::{ChatFormat, Encoded, Message};
use herd_engine::checkpoint::{load_chat, load_model};
use herd_engine::generate::{generate, SamplingConfig};
use herd_engine::objective::{self, Pair};

const FAMILIES: [&str; 6] = [
    "llama31",
    "llama31gen",
    "chatml",
    "llama2",
    "zephyr",
    "qwen2",
];

fn dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/families")
        .join(family)
}

fn expected_of(family: &str) -> serde_json::Value {
    let p = dir(family).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The DPO rows of a family as herd encodes them, checked against the
/// fixture's (TRL's tokenization).
fn dpo_pairs(chat: &ChatFormat, e: &serde_json::Value, family: &str) -> Vec<Pair> {
    let prefs = [
        (
            vec![Message::new(
                "user",
                "Translate 'good morning' into German.",
            )],
            "Guten Morgen.",
            "I'm sorry, but I cannot help with that request!",
        ),
        (
            vec![
                Message::new("system", "Answer briefly."),
                Message::new("user", "Please write a short poem about the sea."),
            ],
            "The sea and the sky, blue on blue.",
            "No.",
        ),
    ];
    prefs
        .iter()
        .zip(e["dpo"]["rows"].as_array().unwrap())
        .map(|((prompt, chosen, rejected), want)| {
            let (p, sides) = chat.encode_exchange(prompt, &[chosen, rejected]).unwrap();
            let mut both = sides.into_iter().map(|c| {
                let mut s = p.clone();
                s.extend(&c);
                s
            });
            let (chosen, rejected) = (both.next().unwrap(), both.next().unwrap());
            for (got, side) in [(&chosen, "chosen"), (&rejected, "rejected")] {
                let w = seq(&want[side]);
                assert_eq!(got.ids, w.ids, "{family} dpo {side} ids");
                assert_eq!(
                    got.target_mask, w.target_mask,
                    "{family} dpo {side} target mask"
                );
                assert_eq!(
                    got.format_mask, w.format_mask,
                    "{family} dpo {side} format mask"
                );
            }
            Pair { chosen, rejected }
        })
        .collect()
}

#[test]
fn chat_ids_masks_and_special_tokens_match_transformers() {
    for family in FAMILIES {
        let e = expected_of(family);
        let chat = load_chat(&dir(family)).unwrap();
        assert_eq!(
            chat.template.has_generation,
            e["template_has_generation"].as_bool().unwrap(),
            "{family}"
        );
        let s = &e["special"];
        assert_eq!(
            chat.special.bos,
            s["bos"].as_u64().map(|x| x as u32),
            "{family} bos"
        );
        assert_eq!(
            chat.special.eos,
            s["eos"].as_u64().map(|x| x as u32),
            "{family} eos"
        );
        assert_eq!(
            chat.special.pad,
            s["pad"].as_u64().unwrap() as u32,
            "{family} pad"
        );
        let mut stops = ids(&s["stops"]);
        let mut got = chat.stop_ids();
        stops.sort();
        got.sort();
        assert_eq!(got, stops, "{family} stops");
        for (k, d) in e["dialogs"].as_array().unwrap().iter().enumerate() {
            let enc = chat.encode_dialog(&messages(&d["messages"])).unwrap();
            assert_eq!(enc.ids, ids(&d["ids"]), "{family} dialog {k} ids");
            assert_eq!(
                enc.target_mask,
                mask(&d["target_mask"]),
                "{family} dialog {k} target mask"
            );
            assert_eq!(
                enc.format_mask,
                mask(&d["format_mask"]),
                "{family} dialog {k} format mask"
            );
        }
        for (k, g) in e["generation_prompts"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let enc = chat.encode_prompt(&messages(&g["messages"])).unwrap();
            assert_eq!(enc.ids, ids(&g["ids"]), "{family} generation prompt {k}");
        }
        let t = chat
            .encode_text(e["text"]["text"].as_str().unwrap())
            .unwrap();
        assert_eq!(t.ids, ids(&e["text"]["ids"]), "{family} text ids");
        assert_eq!(
            t.target_mask,
            mask(&e["text"]["target_mask"]),
            "{family} text targets"
        );
        dpo_pairs(&chat, &e, family);
    }
}

#[test]
fn only_the_last_turn_trains_when_asked() {
    let chat = load_chat(&dir("chatml")).unwrap();
    let e = expected_of("chatml");
    let d = &e["dialogs"][0];
    let all = chat.encode_dialog(&messages(&d["messages"])).unwrap();
    let last = chat
        .encode_dialog_turns(&messages(&d["messages"]), true)
        .unwrap();
    assert_eq!(all.ids, last.ids);
    let first_target = |m: &[u8]| m.iter().position(|x| *x == 1).unwrap();
    assert!(first_target(&last.target_mask) > first_target(&all.target_mask));
    // The last turn's targets are the same either way.
    let tail = first_target(&last.target_mask);
    assert_eq!(all.target_mask[tail..], last.target_mask[tail..]);
    assert!(all.target_mask[..tail].contains(&1));
}

#[test]
fn logits_match_transformers() {
    for family in FAMILIES {
        let e = expected_of(family);
        let model = load_model(&dir(family), &device()).unwrap();
        let input = ids(&e["dialogs"][1]["ids"]);
        let logits = model
            .forward(
                &Tensor::new(input.as_slice(), &device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        close_all(&got, &flat(&e["logits"]), &format!("{family} logits"));
    }
}

#[test]
fn sft_loss_and_gradients_match_transformers() {
    for family in FAMILIES {
        let e = expected_of(family);
        let chat = load_chat(&dir(family)).unwrap();
        let model = load_model(&dir(family), &device()).unwrap();
        let seqs: Vec<Encoded> = e["dialogs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| chat.encode_dialog(&messages(&d["messages"])).unwrap())
            .collect();
        let (loss, tokens) = objective::sft_loss(&model, &seqs, chat.special.pad).unwrap();
        assert_eq!(
            tokens as u64,
            e["sft"]["tokens"].as_u64().unwrap(),
            "{family}"
        );
        close(
            loss.to_scalar::<f32>().unwrap() as f64,
            e["sft"]["loss"].as_f64().unwrap(),
            &format!("{family} sft loss"),
        );
        let params = model.params();
        let grads = herd_engine::optim::gradients(&loss, &params).unwrap();
        close(
            herd_engine::optim::global_norm(&grads).unwrap(),
            e["sft"]["grad_norm"].as_f64().unwrap(),
            &format!("{family} sft grad norm"),
        );
        for (name, w) in e["sft"]["grads"].as_object().unwrap() {
            let i = params
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{family}: no {name}"));
            let got: Vec<f32> = grads[i].flatten_all().unwrap().to_vec1().unwrap();
            close_all(&got, &flat(w), &format!("{family} sft grad {name}"));
        }
    }
}

#[test]
fn dpo_with_and_without_format_masking_matches_transformers() {
    for family in FAMILIES {
        let e = expected_of(family);
        let chat = load_chat(&dir(family)).unwrap();
        let policy = load_model(&dir(family), &device()).unwrap();
        let reference = load_model(&dir(family).join("reference"), &device()).unwrap();
        let pairs = dpo_pairs(&chat, &e, family);
        let d = &e["dpo"];
        for (key, mask_format) in [("unmasked", false), ("masked", true)] {
            for share in [false, true] {
                let (rc, rr) = objective::reference_logps(
                    &reference,
                    &pairs,
                    mask_format,
                    share,
                    chat.special.pad,
                )
                .unwrap();
                check_dpo_step_padded(
                    &policy,
                    &pairs,
                    (&rc, &rr),
                    (d["beta"].as_f64().unwrap(), d["alpha"].as_f64().unwrap()),
                    mask_format,
                    share,
                    &policy.params(),
                    &d[key],
                    &format!("{family} ({key}, share_prompt={share})"),
                    chat.special.pad,
                );
            }
        }
    }
}

#[test]
fn greedy_generation_with_the_models_stop_tokens_matches_transformers() {
    for family in FAMILIES {
        let e = expected_of(family);
        let chat = load_chat(&dir(family)).unwrap();
        let model = load_model(&dir(family), &device()).unwrap();
        let prompt = ids(&e["generate"]["prompt_ids"]);
        let want = ids(&e["generate"]["greedy_ids"]);
        let out = generate(
            &model,
            &[prompt],
            &SamplingConfig::greedy(16, chat.stop_ids()),
            chat.special.pad,
        )
        .unwrap();
        assert_eq!(out[0], want, "{family}");
    }
}

/// A base model given ChatML with its tokens added: the vocabulary and the
/// new rows as transformers' `resize_token_embeddings(len(tokenizer),
/// mean_resizing=True)` makes them (same distribution: the old rows' mean,
/// 1e-9 times their covariance), old rows untouched; the result loads and
/// speaks ChatML.
#[test]
fn chat_format_with_added_tokens_resizes_as_transformers_does() {
    use herd_engine::chat_setup::{setup_chat_format, TemplateChoice};
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("setup_chat_format.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for e in std::fs::read_dir(dir("llama2")).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && n != "chat_template.jinja" && n != "expected.json" {
            std::fs::copy(e.path(), base.join(&n)).unwrap();
        }
    }
    // Without the template's tokens, it refuses unless asked to add them.
    let out = tmp.path().join("out");
    let chatml = TemplateChoice::Builtin(herd_engine::chat::CHATML);
    let err = setup_chat_format(&base, &out, &chatml, false, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<|im_start|>") && err.contains("add_special_tokens"),
        "{err}"
    );
    let summary = setup_chat_format(&base, &out, &chatml, true, 0).unwrap();
    assert_eq!(summary["vocab_size"], want["vocab_size"]);
    let chat = load_chat(&out).unwrap();
    for (t, id) in want["added"].as_object().unwrap() {
        assert_eq!(
            chat.tokenizer.token_to_id(t),
            Some(id.as_u64().unwrap() as u32),
            "{t}"
        );
    }
    let before = herd_engine::checkpoint::load_tensors(&base).unwrap();
    let after = herd_engine::checkpoint::load_tensors(&out).unwrap();
    for (name, key) in [
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "lm_head"),
    ] {
        let (old, new) = (&before[name], &after[name]);
        let v = old.dim(0).unwrap();
        let kept = new.narrow(0, 0, v).unwrap();
        assert_eq!(
            kept.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            old.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}: old rows changed"
        );
        let added = new.narrow(0, v, new.dim(0).unwrap() - v).unwrap();
        let got: Vec<f32> = added.flatten_all().unwrap().to_vec1().unwrap();
        // transformers' own draw, and the mean both draws are centred on.
        close_all(
            &got,
            &flat(&want[format!("{key}_new_rows")]),
            &format!("{name} new rows"),
        );
        let mean = flat(&want[format!("{key}_mean")]);
        let h = mean.len();
        for (i, x) in got.iter().enumerate() {
            assert!(
                (*x as f64 - mean[i % h]).abs() < 1e-4,
                "{name} row not at the mean"
            );
        }
    }
    // It speaks ChatML and stops at <|im_end|>.
    let im_end = chat.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(chat.stop_ids().contains(&im_end));
    let enc = chat
        .encode_dialog(&[
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
        ])
        .unwrap();
    assert!(enc.ids.contains(&im_end));
    assert_eq!(
        *enc.target_mask.iter().rev().find(|_| true).unwrap(),
        0,
        "the newline after <|im_end|> is not a target"
    );
    let model = load_model(&out, &device()).unwrap();
    assert_eq!(
        model.config.vocab_size,
        want["vocab_size"].as_u64().unwrap() as usize
    );
}
