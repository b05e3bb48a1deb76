//! Real models as they come, through the daemon: each template family's
//! directory imports as it is (its own template, tokens, class), `generate`
//! answers prompts with the model's stop tokens exactly as transformers'
//! greedy generation does, a trained model exports with the source's
//! template, special tokens, generation config and class, and bad
//! directories are refused naming the file and field with nothing recorded.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use herd_client::{ArtifactQuery, Client};
use serde_json::{json, Value};

fn family(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

fn expected_of(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(family(name).join("expected.json")).unwrap())
        .unwrap()
}

/// A copy of a family's directory (model files only) to break on purpose.
fn copy_of(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(family(name)).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && n != "expected.json" && !n.ends_with(".py") {
            std::fs::copy(e.path(), dst.join(&n)).unwrap();
        }
    }
    dst
}

fn run_job(c: &Client, body: Value) -> herd_client::Job {
    let id = submit(c, &body);
    let j = c.wait(&id, Duration::from_secs(180)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
    j
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn every_family_imports_generates_trains_and_exports_as_it_came() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    for name in ["llama31", "chatml", "llama2", "zephyr", "qwen2"] {
        let e = expected_of(name);
        let imported = c.import_model(&family(name), name).unwrap();
        let s = &imported.summary;
        assert!(s["chat"]["template"].is_string(), "{name}: {s}");
        let stops = s["chat"]["stops"].as_array().unwrap().len();
        assert_eq!(
            stops,
            e["special"]["stops"].as_array().unwrap().len(),
            "{name}"
        );

        // generate: the short dialog's prompt, greedy, the model's stops.
        let prompts = dir.path().join(format!("{name}-prompts.jsonl"));
        let prompt = &e["generation_prompts"][1]["messages"];
        std::fs::write(&prompts, format!("{}\n", json!({ "prompt": prompt }))).unwrap();
        let p = c.import_dataset(&prompts, "prompts", "p").unwrap().hash;
        let job = run_job(
            &c,
            req(
                "generate",
                &[("model", &imported.hash), ("prompts", &p)],
                json!({"max_new_tokens": 16}),
            ),
        );
        let mut bytes = vec![];
        c.download(&job.outputs["data"], &mut bytes).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let row: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let chat = herd_engine::checkpoint::load_chat(&family(name)).unwrap();
        let greedy: Vec<u32> = e["generate"]["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want = chat.decode(&greedy).unwrap().trim().to_string();
        let messages = row["messages"].as_array().unwrap();
        assert_eq!(messages.last().unwrap()["content"], json!(want), "{name}");

        // One SFT step on the family's dialogs, then export.
        let data = dir.path().join(format!("{name}-sft.jsonl"));
        let rows: Vec<String> = e["dialogs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| json!({"messages": d["messages"]}).to_string())
            .collect();
        std::fs::write(&data, rows.join("\n")).unwrap();
        let sft = c.import_dataset(&data, "sft", "d").unwrap().hash;
        let trained = run_job(
            &c,
            req(
                "sft",
                &[("model", &imported.hash), ("data", &sft)],
                json!({"steps": 1, "batch_size": 2}),
            ),
        );
        let exported = dir.path().join(format!("{name}-exported"));
        c.export(&trained.outputs["checkpoint"], &exported).unwrap();
        for f in std::fs::read_dir(family(name)).unwrap().flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            if !f.path().is_file()
                || matches!(
                    n.as_str(),
                    "config.json" | "model.safetensors" | "expected.json"
                )
            {
                continue;
            }
            assert_eq!(
                std::fs::read(exported.join(&n)).ok(),
                Some(std::fs::read(f.path()).unwrap()),
                "{name}: {n} did not travel unchanged"
            );
        }
        let src: Value = serde_json::from_str(
            &std::fs::read_to_string(family(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let out: Value =
            serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
                .unwrap();
        for key in [
            "model_type",
            "architectures",
            "tie_word_embeddings",
            "head_dim",
        ] {
            if src.get(key).is_some() {
                assert_eq!(out[key], src[key], "{name}: {key}");
            }
        }
        // It reloads in herd with the same chat format.
        let back = herd_engine::checkpoint::load_chat(&exported).unwrap();
        assert_eq!(back.stop_ids(), chat.stop_ids(), "{name}");
        herd_engine::checkpoint::load_model(&exported, &candle_core::Device::Cpu).unwrap();
    }
}

#[test]
fn bad_model_directories_name_the_file_and_field_and_record_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let count = |c: &Client| c.artifacts(&ArtifactQuery::default()).unwrap().len();
    let before = count(&c);
    let refused = |path: &Path, want: &[&str]| {
        let err = c.import_model(path, "bad").unwrap_err().to_string();
        for w in want {
            assert!(err.contains(w), "expected {w:?} in: {err}");
        }
    };

    // A template that raises: its own words and line.
    let raising = copy_of("chatml", dir.path());
    std::fs::write(
        raising.join("chat_template.jinja"),
        "{% for m in messages %}\n{{ raise_exception('this model only chats in French') }}\n{% endfor %}",
    )
    .unwrap();
    refused(
        &raising,
        &[
            "chat_template.jinja",
            "this model only chats in French",
            "line 2",
        ],
    );

    // A template that changes the content it renders.
    let shouting = copy_of("chatml", dir.path());
    std::fs::write(
        shouting.join("chat_template.jinja"),
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content.upper() + '<|im_end|>\n' }}{% endfor %}",
    )
    .unwrap();
    refused(
        &shouting,
        &["chat_template.jinja", "not found in the content"],
    );

    // An architecture herd does not compute.
    let gemma = copy_of("llama2", dir.path());
    edit_json(&gemma.join("config.json"), |v| {
        v["architectures"] = json!(["GemmaForCausalLM"]);
        v["model_type"] = json!("gemma");
    });
    refused(&gemma, &["config.json", "model_type", "gemma"]);

    // A RoPE type herd does not compute.
    let longrope = copy_of("llama2", dir.path());
    edit_json(&longrope.join("config.json"), |v| {
        v["rope_parameters"] =
            json!({"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0});
    });
    refused(&longrope, &["config.json", "rope_type", "longrope"]);

    // Special token ids past the model's vocabulary.
    let small = copy_of("qwen2", dir.path());
    edit_json(&small.join("config.json"), |v| v["vocab_size"] = json!(400));
    refused(&small, &["tokenizer_config.json", "vocab_size 400"]);

    // A special token the vocabulary lacks.
    let missing = copy_of("zephyr", dir.path());
    edit_json(&missing.join("tokenizer_config.json"), |v| {
        v["eos_token"] = json!("<|end|>")
    });
    refused(&missing, &["tokenizer_config.json", "eos_token", "<|end|>"]);

    assert_eq!(count(&c), before, "a refused import recorded something");
}

/// `herd import model DIR --chat-template chatml --add-special-tokens` on a
/// base model with no template: the import, then a `chat_format` checkpoint
/// whose lineage names the import and what was added, which trains on
/// dialogs and exports with its new template and tokens.
#[test]
fn a_base_model_gets_a_chat_template_and_its_tokens_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let base = copy_of("llama2", dir.path());
    std::fs::remove_file(base.join("chat_template.jinja")).unwrap();
    // A base model imports without a template; dialogs need one.
    let plain = c.import_model(&base, "base").unwrap();
    assert!(plain.summary["chat"].is_null(), "{}", plain.summary);

    let out = d.herd(&[
        "import",
        "model",
        base.to_str().unwrap(),
        "--chat-template",
        "chatml",
        "--add-special-tokens",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], plain.hash, "{stdout}");
    let hash = lines
        .iter()
        .skip(1)
        .find(|l| l.len() == 64 && l.chars().all(|ch| ch.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no new hash in {stdout}"));
    let node = c.lineage(hash).unwrap();
    let job = node.job.expect("made by a job");
    assert_eq!(job.kind.as_str(), "chat_format");
    assert_eq!(job.inputs["model"].hash, plain.hash);
    let made = c.job(&job.id.to_string()).unwrap();
    assert_eq!(
        made.summary["added_tokens"],
        json!(["<|im_start|>", "<|im_end|>"])
    );
    assert_eq!(made.summary["vocab_size"], json!(565));

    let data = dir.path().join("sft.jsonl");
    std::fs::write(
        &data,
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
            .to_string(),
    )
    .unwrap();
    let sft = c.import_dataset(&data, "sft", "d").unwrap().hash;
    let trained = run_job(
        &c,
        req(
            "sft",
            &[("model", hash), ("data", &sft)],
            json!({"steps": 1, "batch_size": 1}),
        ),
    );
    let exported = dir.path().join("exported");
    c.export(&trained.outputs["checkpoint"], &exported).unwrap();
    let template = std::fs::read_to_string(exported.join("chat_template.jinja")).unwrap();
    assert!(template.contains("<|im_start|>"));
    let tc: Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["eos_token"], json!("<|im_end|>"));
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(g["eos_token_id"][0], json!(564));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vocab_size"], json!(565));

    // Unknown names and tokens a Jinja template can't add are refused.
    let bad = d.herd(&[
        "import",
        "model",
        base.to_str().unwrap(),
        "--chat-template",
        "vicuna",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("vicuna"), "{err}");
    if std::env::var_os("HERD_KEEP_EXPORT").is_some() {
        let keep = std::path::PathBuf::from(std::env::var_os("HERD_KEEP_EXPORT").unwrap());
        let _ = std::fs::create_dir_all(&keep);
        for f in std::fs::read_dir(&exported).unwrap().flatten() {
            std::fs::copy(f.path(), keep.join(f.file_name())).unwrap();
        }
    }
}
