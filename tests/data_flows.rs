//! The recipe's data flows through the real binaries: what a trained
//! checkpoint carries out of herd, mixing datasets, and preferences that
//! accumulate across rounds.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Every file of a directory by name, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn run_job(c: &herd_client::Client, body: Value) -> herd_client::Job {
    let id = c.post("/jobs", &body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let j = c.wait(&id, Duration::from_secs(180)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
    j
}

/// A trained model leaves herd with everything its base came with: the
/// tokenizer, its config with the chat template, the special tokens map and
/// the generation config (stop tokens); config.json says what training
/// changed; the exported tokenizer loads and speaks the same chat format.
#[test]
fn export_keeps_every_file_of_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();

    // The fixture policy with the files a Hub checkpoint has beside it.
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for (name, bytes) in files(&fixtures().join("policy")) {
        std::fs::write(base.join(name), bytes).unwrap();
    }
    let chat = herd_engine::chat::ChatFormat::from_file(&base.join("tokenizer.json")).unwrap();
    for (name, json) in herd_engine::chat::hf_tokenizer_files(&chat, 512) {
        std::fs::write(base.join(name), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    }
    std::fs::write(base.join("README.md"), "# a model card\n").unwrap();
    let before = files(&base);
    let model = c.import_model(&base, "base").unwrap().hash;
    let sft = c
        .import_dataset(&fixtures().join("sft.jsonl"), "sft", "sft")
        .unwrap()
        .hash;
    let prefs = c
        .import_dataset(&fixtures().join("preferences.jsonl"), "preference", "p")
        .unwrap()
        .hash;

    let trained = run_job(
        &c,
        req(
            "sft",
            &[("model", &model), ("data", &sft)],
            json!({"steps": 1, "batch_size": 2}),
        ),
    );
    let out = dir.path().join("exported");
    c.export(&trained.outputs["checkpoint"], &out).unwrap();
    let after = files(&out);
    for (name, bytes) in &before {
        if name == "config.json" || name == "model.safetensors" {
            continue;
        }
        assert_eq!(
            after.get(name),
            Some(bytes),
            "{name} did not travel with the trained model"
        );
    }
    assert!(after.contains_key("model.safetensors"));
    let config: Value = serde_json::from_slice(&after["config.json"]).unwrap();
    assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
    let tok_config: Value = serde_json::from_slice(&after["tokenizer_config.json"]).unwrap();
    assert!(tok_config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|start_header_id|>"));
    let generation: Value = serde_json::from_slice(&after["generation_config.json"]).unwrap();
    assert!(generation["eos_token_id"]
        .as_array()
        .unwrap()
        .contains(&json!(chat.special.eot)));
    // The exported tokenizer loads and encodes a dialog as the base's did.
    let back = herd_engine::chat::ChatFormat::from_file(&out.join("tokenizer.json")).unwrap();
    let dialog = [herd_engine::chat::Message::new("user", "2+2?")];
    assert_eq!(
        back.encode_prompt(&dialog).unwrap().ids,
        chat.encode_prompt(&dialog).unwrap().ids
    );
    herd_engine::checkpoint::load_model(&out, &candle_core::Device::Cpu).unwrap();

    // A reward model keeps the tokenizer files and drops the generation
    // config (it does not generate); its config says so.
    let rm = run_job(
        &c,
        req(
            "rm",
            &[("model", &model), ("data", &prefs)],
            json!({"steps": 1, "batch_size": 2}),
        ),
    );
    let rm_out = dir.path().join("rm");
    c.export(&rm.outputs["checkpoint"], &rm_out).unwrap();
    let rm_files = files(&rm_out);
    assert!(!rm_files.contains_key("generation_config.json"));
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ] {
        assert_eq!(rm_files.get(name), before.get(name), "{name}");
    }
    let config: Value = serde_json::from_slice(&rm_files["config.json"]).unwrap();
    assert_eq!(
        config["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
}
