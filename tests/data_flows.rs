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
        .contains(&json!(chat.special.eos.unwrap())));
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

/// Rows of a stored dataset, as JSON.
fn rows_of(c: &herd_client::Client, hash: &str) -> Vec<Value> {
    let mut bytes = vec![];
    c.download(hash, &mut bytes).unwrap();
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn import_rows(
    c: &herd_client::Client,
    dir: &Path,
    name: &str,
    kind: &str,
    rows: &[Value],
) -> String {
    let path = dir.join(format!("{name}.jsonl"));
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    c.import_dataset(&path, kind, name).unwrap().hash
}

fn sft_row(i: usize) -> Value {
    json!({"messages": [{"role": "user", "content": format!("q{i}")}, {"role": "assistant", "content": format!("a{i}")}]})
}

/// `mix`: exact duplicates across inputs dropped first (the earlier input by
/// name keeps them), then each input's share by weight or count, seeded;
/// lineage to every input; one kind only, and weights must name inputs.
#[test]
fn mix_weights_counts_duplicates_and_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let a_rows: Vec<Value> = (0..6).map(sft_row).collect();
    // b repeats a's first row and has one row twice.
    let b_rows = vec![sft_row(0), sft_row(10), sft_row(11), sft_row(11)];
    let a = import_rows(&c, dir.path(), "a", "sft", &a_rows);
    let b = import_rows(&c, dir.path(), "b", "sft", &b_rows);

    let mix = |hp: Value, seed: u64| {
        let mut body = req("mix", &[("a", &a), ("b", &b)], hp);
        body["seed"] = seed.into();
        run_job(&c, body)
    };
    // b up-weighted: its 2 unique rows twice each; a down to 3 rows, seeded.
    let j = mix(json!({"weights": {"b": 2.0}, "counts": {"a": 3}}), 5);
    let out = &j.outputs["data"];
    let rows = rows_of(&c, out);
    assert_eq!(rows.len(), 3 + 4, "{rows:?}");
    let (from_a, from_b) = rows.split_at(3);
    assert!(from_a.iter().all(|r| a_rows.contains(r)));
    let mut distinct_a = from_a.to_vec();
    distinct_a.dedup();
    assert_eq!(distinct_a.len(), 3, "down-sampling takes distinct rows");
    assert_eq!(from_b, [sft_row(10), sft_row(10), sft_row(11), sft_row(11)]);
    assert_eq!(j.summary["inputs"]["b"]["duplicates"], 2, "{}", j.summary);
    assert_eq!(j.summary["duplicates_dropped"], 2);
    // The same seed gives the same bytes; the output is an sft dataset.
    assert_eq!(
        mix(json!({"weights": {"b": 2.0}, "counts": {"a": 3}}), 5).outputs["data"],
        *out
    );
    let art = c.artifact(out, 0).unwrap().artifact;
    assert_eq!(art.artifact, herd_core::ArtifactKind::Sft);
    // Lineage reaches both inputs.
    let lineage = c.lineage(out).unwrap();
    let job = lineage.job.expect("produced by the mix job");
    let inputs: BTreeMap<String, String> = job
        .inputs
        .iter()
        .map(|(n, node)| (n.clone(), node.hash.clone()))
        .collect();
    assert_eq!(
        inputs,
        BTreeMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())])
    );
    // Defaults: every unique row once.
    let all = rows_of(&c, &mix(json!({}), 1).outputs["data"]);
    assert_eq!(all.len(), 8);

    // Refused at submit, saying why.
    let prefs = c
        .import_dataset(&fixtures().join("preferences.jsonl"), "preference", "p")
        .unwrap()
        .hash;
    let refused = |body: Value, want: &str| {
        let err = c.post("/jobs", &body).unwrap_err().to_string();
        assert!(err.contains(want), "wanted {want:?} in {err}");
    };
    refused(
        req("mix", &[("a", &a), ("p", &prefs)], json!({})),
        "takes inputs of one kind: `a` is sft, `p` is preference",
    );
    refused(
        req("mix", &[("a", &a)], json!({"weights": {"typo": 2.0}})),
        "no input `typo`",
    );
    refused(
        req(
            "mix",
            &[("a", &a)],
            json!({"weights": {"a": 2.0}, "counts": {"a": 1}}),
        ),
        "both a weight and a count",
    );
    refused(req("mix", &[], json!({})), "at least 1 input");

    // $all_preferences stands for many datasets: only a job that takes any
    // input names may have it.
    let exp = c.create_experiment("flows", "").unwrap();
    let spec = json!({"experiment": exp, "jobs": [
        {"name": "rm", "kind": "rm", "inputs": {"model": "$policy", "data": "$all_preferences"}}],
        "vars": {"policy": a}});
    let err = c.submit_round(&spec).unwrap_err().to_string();
    assert!(
        err.contains("$all_preferences stands for many datasets"),
        "{err}"
    );
}

/// `$all_preferences` takes each earlier round's annotations as they stand
/// at submit: a recorded output by hash, an annotate job that may still run
/// as `job:<id>/data` (the mix then waits for it), a failed one not at all.
#[test]
fn all_preferences_follows_earlier_rounds_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let (model, _, _, prefs, sft) = import_fixtures(&c);
    // Prompts without answers: annotate fails (the checker needs them).
    let unanswerable = import_rows(&c, dir.path(), "q", "prompts", &[json!({"prompt": "Hi"})]);
    let answerable = import_rows(
        &c,
        dir.path(),
        "a",
        "prompts",
        &[json!({"prompt": "Compute 17 + 25.", "answer": 42})],
    );
    let exp = c.create_experiment("prefs", "").unwrap();

    // Round 0: its annotate fails.
    let r0 = c
        .submit_round(&json!({"experiment": exp, "vars": {"policy": model, "prompts": unanswerable},
            "jobs": [{"name": "annotate", "kind": "annotate", "inputs": {"policy": "$policy", "prompts": "$prompts"}}]}))
        .unwrap();
    let failed = c
        .wait(&r0.jobs[0].to_string(), Duration::from_secs(60))
        .unwrap();
    assert_eq!(failed.status, herd_client::JobStatus::Failed);

    // Round 1: its annotate waits behind a long SFT, so it is still queued.
    let r1 = c
        .submit_round(&json!({"experiment": exp, "vars": {"policy": model, "prompts": answerable, "sft": sft},
            "jobs": [
                {"name": "long", "kind": "sft", "inputs": {"model": "$policy", "data": "$sft"}, "hyperparameters": {"steps": 1000000}},
                {"name": "annotate", "kind": "annotate", "inputs": {"policy": "long.checkpoint", "prompts": "$prompts"}}]}))
        .unwrap();
    let pending = r1.jobs[1];

    // Round 2: the mix gets round 1's annotations by job reference and
    // depends on that job; round 0's failed one is not there.
    let r2 = c
        .submit_round(&json!({"experiment": exp, "vars": {"policy": model, "prefs": prefs},
            "jobs": [{"name": "all", "kind": "mix", "inputs": {"earlier": "$all_preferences", "new": "$prefs"}}]}))
        .unwrap();
    let mix = c.job(&r2.jobs[0].to_string()).unwrap();
    assert_eq!(
        mix.inputs,
        BTreeMap::from([
            ("earlier_r1".to_string(), format!("job:{pending}/data")),
            ("new".to_string(), prefs.clone()),
        ])
    );
    assert!(mix.depends_on.contains(&pending), "{:?}", mix.depends_on);
    for id in [r1.jobs[0], r1.jobs[1], r2.jobs[0]] {
        let _ = c.cancel(&id.to_string());
    }
}
