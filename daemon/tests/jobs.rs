//! The recipes as jobs, run in-process: fixture-exact first steps, each kind
//! doing its job on a small model, determinism, NaN handling, validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::*;
use herd_daemon::jobs::{self, JobKind, MemorySink};
use serde_json::{json, Value};

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
        "{what}: got {a}, expected {b}"
    );
}

fn first(sink: &MemorySink, name: &str) -> f64 {
    sink.series(name)[0]
}

#[test]
fn first_steps_match_the_fixtures() {
    let e = expected();
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let one = json!({"steps": 1, "batch_size": 3});
    for (masked, key) in [(true, "masked"), (false, "unmasked")] {
        let mut hp = one.clone();
        hp["mask_format_tokens"] = masked.into();
        // The fixture trains on all three pairs, the slightly better one too.
        hp["min_strength"] = "slightly_better".into();
        let r = run(
            JobKind::Dpo,
            hp,
            0,
            &[
                ("model", &f.join("policy")),
                ("reference", &f.join("ref")),
                ("data", &f.join("preferences.jsonl")),
            ],
            dir.path(),
        );
        r.summary.unwrap();
        close(
            first(&r.sink, "loss"),
            e["dpo"][key]["loss"].as_f64().unwrap(),
            "dpo loss",
        );
        close(
            first(&r.sink, "grad_norm"),
            e["dpo"][key]["grad_norm"].as_f64().unwrap(),
            "dpo grad_norm",
        );
        close(
            first(&r.sink, "nll"),
            e["dpo"][key]["nll"].as_f64().unwrap(),
            "dpo nll",
        );
        close(
            first(&r.sink, "reward_accuracy"),
            e["dpo"][key]["reward_accuracy"].as_f64().unwrap(),
            "dpo reward accuracy",
        );
    }
    let r = run(
        JobKind::Sft,
        one.clone(),
        0,
        &[("model", &f.join("ref")), ("data", &f.join("sft.jsonl"))],
        dir.path(),
    );
    r.summary.unwrap();
    close(
        first(&r.sink, "loss"),
        e["sft"]["loss"].as_f64().unwrap(),
        "sft loss",
    );
    assert_eq!(
        first(&r.sink, "tokens") as u64,
        e["sft"]["tokens"].as_u64().unwrap(),
        "tokens counts target tokens only"
    );
    let r = run(
        JobKind::Rm,
        one,
        0,
        &[
            ("model", &f.join("rm")),
            ("data", &f.join("preferences.jsonl")),
        ],
        dir.path(),
    );
    r.summary.unwrap();
    close(
        first(&r.sink, "loss"),
        e["rm"]["loss"].as_f64().unwrap(),
        "rm loss",
    );
    close(
        first(&r.sink, "accuracy"),
        e["rm"]["accuracy"].as_f64().unwrap(),
        "rm accuracy",
    );
}

fn qa(i: usize) -> (String, String, String) {
    let (a, b) = (i % 7 + 1, i % 5 + 2);
    (
        format!("Compute {a} + {b}."),
        format!("The answer is {}.", a + b),
        "I'm sorry, I cannot help with that request!".to_string(),
    )
}

#[test]
fn sft_loss_falls_and_runs_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 1);
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            let (q, a, _) = qa(i);
            json!({"prompt": q, "completion": a})
        })
        .collect();
    let data = write(dir.path(), "sft.jsonl", &rows);
    let hp = json!({"lr": 3e-3, "steps": 30, "batch_size": 4, "warmup_steps": 2});
    let a = run(
        JobKind::Sft,
        hp.clone(),
        5,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    a.summary.unwrap();
    let loss = a.sink.series("loss");
    assert!(
        loss[loss.len() - 1] < 0.7 * loss[0],
        "sft loss did not fall: {loss:?}"
    );
    let b = run(
        JobKind::Sft,
        hp,
        5,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    b.summary.unwrap();
    assert_eq!(
        a.sink.output_hash("checkpoint"),
        b.sink.output_hash("checkpoint"),
        "same inputs and seed, same checkpoint"
    );
    assert_eq!(a.sink.series("loss"), b.sink.series("loss"));
    // Packed rows train too.
    let c = run(
        JobKind::Sft,
        json!({"lr": 3e-3, "steps": 3, "packing": true}),
        5,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    c.summary.unwrap();
}

#[test]
fn rm_learns_separable_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 2);
    let rows: Vec<Value> = (0..24)
        .map(|i| {
            let (q, good, bad) = qa(i);
            json!({"prompt": q, "chosen": good, "rejected": bad, "strength": "better"})
        })
        .collect();
    let data = write(dir.path(), "pref.jsonl", &rows);
    let r = run(
        JobKind::Rm,
        json!({"lr": 2e-3, "steps": 25, "batch_size": 8, "heldout_fraction": 0.2}),
        3,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    let summary = r.summary.unwrap();
    let acc = r.sink.series("accuracy");
    assert!(
        summary["heldout_accuracy"].as_f64().unwrap() > 0.9,
        "{summary}"
    );
    assert!(acc[acc.len() - 1] > 0.9, "{acc:?}");
}

#[test]
fn dpo_raises_reward_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 4);
    let rows: Vec<Value> = (0..8)
        .map(|i| {
            let (q, good, bad) = qa(i);
            json!({"prompt": q, "responses": [good, bad], "strength": "significantly_better"})
        })
        .collect();
    let data = write(dir.path(), "pref.jsonl", &rows);
    let r = run(
        JobKind::Dpo,
        json!({"lr": 2e-3, "steps": 12, "batch_size": 8}),
        3,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    r.summary.unwrap();
    let acc = r.sink.series("reward_accuracy");
    let margin = r.sink.series("reward_margin");
    assert!(
        acc[acc.len() - 1] >= 0.99 && margin[margin.len() - 1] > margin[0],
        "acc {acc:?} margin {margin:?}"
    );
    assert!(
        r.sink.output_hash("reference_logps").is_some(),
        "reference log-probs recorded"
    );
}

/// Preference strength as Llama 3 uses it: the RM drops pairs marked
/// marginally better (negligibly better / unsure) by default, DPO keeps only
/// significantly better and better; rows without a strength are kept; a
/// stricter setting drops more and says how many.
#[test]
fn strength_filters_what_rm_and_dpo_train_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 2);
    let levels = [
        Some("significantly_better"),
        Some("better"),
        Some("slightly_better"),
        Some("marginally_better"),
        None,
    ];
    let rows: Vec<Value> = (0..20)
        .map(|i| {
            let (q, good, bad) = qa(i);
            let mut row = json!({"prompt": q, "chosen": good, "rejected": bad});
            if let Some(s) = levels[i % 5] {
                row["strength"] = s.into();
            }
            row
        })
        .collect();
    let data = write(dir.path(), "pref.jsonl", &rows);
    let kept = |kind: JobKind, hp: Value| {
        let r = run(
            kind,
            hp,
            0,
            &[("model", &model), ("data", &data)],
            dir.path(),
        );
        r.summary.unwrap();
        r.sink.notes.join("\n")
    };
    let one = json!({"steps": 1, "batch_size": 2, "heldout_fraction": 0.0});
    let rm = kept(JobKind::Rm, one.clone());
    assert!(
        rm.contains("16 examples kept, 4 dropped as weaker than slightly_better"),
        "{rm}"
    );
    let mut strict = one.clone();
    strict["min_strength"] = "significantly_better".into();
    let rm = kept(JobKind::Rm, strict);
    assert!(
        rm.contains("8 examples kept, 12 dropped as weaker than significantly_better"),
        "{rm}"
    );
    let one = json!({"steps": 1, "batch_size": 2});
    let dpo = kept(JobKind::Dpo, one.clone());
    assert!(
        dpo.contains("12 pairs kept, 8 dropped as weaker than better"),
        "{dpo}"
    );
    let mut all = one;
    all["min_strength"] = "marginally_better".into();
    assert!(!kept(JobKind::Dpo, all).contains("dropped as weaker"));
    // A level that does not exist is refused at submit, naming the field.
    let err =
        jobs::effective_hyperparameters(JobKind::Dpo, &json!({"min_strength": "meh"})).unwrap_err();
    assert!(err.contains("min_strength"), "{err}");
}

#[test]
fn average_equals_the_mean() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (small_model(dir.path(), 5), small_model(dir.path(), 6));
    let r = run(
        JobKind::Average,
        json!({"weights": [1.0, 3.0]}),
        0,
        &[("a", &a), ("b", &b)],
        dir.path(),
    );
    r.summary.unwrap();
    let out = dir.path().join("avg");
    let hash = r.sink.output_hash("checkpoint").unwrap();
    r.sink.blobs.materialize(hash, &out).unwrap();
    let ta = herd_engine::checkpoint::load_tensors(&a).unwrap();
    let tb = herd_engine::checkpoint::load_tensors(&b).unwrap();
    let to = herd_engine::checkpoint::load_tensors(&out).unwrap();
    for (name, t) in &to {
        let want = ((&ta[name] * 0.25).unwrap() + (&tb[name] * 0.75).unwrap()).unwrap();
        let diff = (t - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{name}: {diff}");
    }
}

#[test]
fn curate_removes_exactly_the_planted_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = vec![];
    for i in 0..20 {
        rows.push(json!({"prompt": format!("Question number {i} about topic {}", i * 7), "completion": format!("Answer {i}: a calm factual reply about item {}.", i * 13)}));
    }
    rows.push(json!({"prompt": "Excited?", "completion": "Yes!!!! Absolutely!!!"})); // exclamations
    rows.push(
        json!({"prompt": "Party?", "completion": "Sure \u{1F389}\u{1F389}\u{1F389}\u{1F389} fun"}),
    ); // emoji
    rows.push(rows[3].clone()); // duplicate
    rows.push(json!({"prompt": "Help 1", "completion": "I'm sorry, I cannot do that."}));
    rows.push(json!({"prompt": "Help 2", "completion": "I apologize, but no."}));
    rows.push(json!({"prompt": "Help 3", "completion": "I am sorry about that."}));
    let data = write(dir.path(), "sft.jsonl", &rows);
    // 20 plain rows; share 0.1 allows floor(0.1/0.9*20) = 2 apologetic rows.
    let r = run(
        JobKind::Curate,
        json!({}),
        0,
        &[("data", &data)],
        dir.path(),
    );
    let s = r.summary.unwrap();
    assert_eq!(s["dropped"]["emoji_or_exclamation"], 2, "{s}");
    assert_eq!(s["dropped"]["near_duplicate"], 1, "{s}");
    assert_eq!(s["dropped"]["apology_excess"], 1, "{s}");
    assert_eq!(s["rows_out"], 22, "{s}");
    let out = output_text(&r.sink, "data");
    assert!(!out.contains("!!!!") && !out.contains("\u{1F389}") && !out.contains("I am sorry"));
}

#[test]
fn sample_keeps_the_best_scored_sample() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        &[
            json!({"prompt": "Compute 17 + 25.", "answer": 42}),
            json!({"prompt": "What is the capital of France?"}),
        ],
    );
    let hp = json!({"k": 4, "max_new_tokens": 8, "temperature": 1.0});
    let r = run(
        JobKind::Sample,
        hp.clone(),
        9,
        &[
            ("policy", &f.join("ref")),
            ("rm", &f.join("rm")),
            ("prompts", &prompts),
        ],
        dir.path(),
    );
    let s = r.summary.unwrap();
    assert_eq!(s["kept"], 2, "{s}");
    // Recompute: same seed, same samples; the kept one has the top score.
    let policy =
        herd_engine::checkpoint::load_model(&f.join("ref"), &candle_core::Device::Cpu).unwrap();
    let rm = herd_engine::checkpoint::load_model(&f.join("rm"), &candle_core::Device::Cpu).unwrap();
    let chat = herd_engine::checkpoint::load_chat(&f.join("ref")).unwrap();
    let msgs = vec![
        vec![herd_engine::chat::Message::new("user", "Compute 17 + 25.")],
        vec![herd_engine::chat::Message::new(
            "user",
            "What is the capital of France?",
        )],
    ];
    let g: jobs::GenParams =
        serde_json::from_value(jobs::effective_hyperparameters(JobKind::Sample, &hp).unwrap())
            .unwrap();
    let samples = jobs::complete(&policy, &chat, &msgs, 4, &g, 9, |_, _| {}).unwrap();
    let out = output_text(&r.sink, "data");
    for (i, line) in out.lines().enumerate() {
        let kept: Value = serde_json::from_str(line).unwrap();
        let text = kept["messages"].as_array().unwrap().last().unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string();
        let scores = jobs::score(&rm, &chat, &msgs[i], &samples[i]).unwrap();
        let best = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let pos = samples[i]
            .iter()
            .position(|x| *x == text)
            .expect("kept text is one of the samples");
        assert_eq!(
            scores[pos], best,
            "prompt {i}: kept {text:?} with {} but best is {best}",
            scores[pos]
        );
    }
}

/// System prompts vary across a prompt's samples: with two, the k samples
/// alternate between them; the kept row starts with the one its best sample
/// was drawn with, and that sample is what generating after that system
/// prompt gives.
#[test]
fn sample_varies_system_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let systems = ["Answer briefly.", "Think step by step."];
    let prompts = write(
        dir.path(),
        "prompts.jsonl",
        &[json!({"prompt": "Compute 17 + 25.", "system": systems})],
    );
    let hp = json!({"k": 4, "max_new_tokens": 6, "temperature": 1.0});
    let r = run(
        JobKind::Sample,
        hp.clone(),
        3,
        &[
            ("policy", &f.join("ref")),
            ("rm", &f.join("rm")),
            ("prompts", &prompts),
        ],
        dir.path(),
    );
    r.summary.unwrap();
    let out = output_text(&r.sink, "data");
    let kept: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let messages = kept["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system", "{kept}");
    let system = messages[0]["content"].as_str().unwrap();
    assert!(systems.contains(&system), "{system}");
    // The same draws again: two samples after each system prompt.
    let policy =
        herd_engine::checkpoint::load_model(&f.join("ref"), &candle_core::Device::Cpu).unwrap();
    let chat = herd_engine::checkpoint::load_chat(&f.join("ref")).unwrap();
    let dialogs: Vec<Vec<herd_engine::chat::Message>> = systems
        .iter()
        .map(|s| {
            vec![
                herd_engine::chat::Message::new("system", s),
                herd_engine::chat::Message::new("user", "Compute 17 + 25."),
            ]
        })
        .collect();
    let g: jobs::GenParams =
        serde_json::from_value(jobs::effective_hyperparameters(JobKind::Sample, &hp).unwrap())
            .unwrap();
    let counted: Vec<(&[herd_engine::chat::Message], usize)> =
        dialogs.iter().map(|d| (d.as_slice(), 2)).collect();
    let samples = jobs::complete_counts(&policy, &chat, &counted, &g, 3, |_, _| {}).unwrap();
    let which = systems.iter().position(|s| *s == system).unwrap();
    let text = messages.last().unwrap()["content"].as_str().unwrap();
    assert!(
        samples[which].iter().any(|x| x == text),
        "{samples:?} {text}"
    );
}

#[test]
fn annotate_ranks_by_the_checker_and_edits() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let rows: Vec<Value> = (0..6)
        .map(|i| {
            let (q, _, _) = qa(i);
            json!({"prompt": q, "answer": (i % 7 + 1) + (i % 5 + 2)})
        })
        .collect();
    let prompts = write(dir.path(), "prompts.jsonl", &rows);
    let r = run(
        JobKind::Annotate,
        json!({"max_new_tokens": 6}),
        1,
        &[("policy", &f.join("ref")), ("prompts", &prompts)],
        dir.path(),
    );
    match r.summary {
        Ok(s) => {
            let out = output_text(&r.sink, "data");
            for line in out.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                let resp = v["responses"].as_array().unwrap();
                assert!((2..=3).contains(&resp.len()));
                if resp.len() == 3 {
                    assert!(
                        resp[0].as_str().unwrap().starts_with("The answer is"),
                        "edited first: {v}"
                    );
                }
            }
            assert!(s["pairs"].as_u64().unwrap() >= 1);
        }
        // A random model can produce indistinguishable pairs; then it says so.
        Err(e) => assert!(e.to_string().contains("could not rank"), "{e}"),
    }
    assert_eq!(
        herd_daemon::jobs::annotator_rank("The answer is 42.", "It is 40.", "42")
            .unwrap()
            .1
            .as_str(),
        "significantly_better"
    );
}

#[test]
fn nan_loss_stops_the_job_naming_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 7);
    let data = write(
        dir.path(),
        "sft.jsonl",
        &[json!({"prompt": "a", "completion": "b"})],
    );
    let r = run(
        JobKind::Sft,
        // lr is at most 1 now; a huge weight decay blows the weights up
        // after the first step just the same.
        json!({"lr": 1.0, "weight_decay": 1e30, "steps": 5, "grad_clip": 0.0}),
        0,
        &[("model", &model), ("data", &data)],
        dir.path(),
    );
    let err = format!("{:#}", r.summary.unwrap_err());
    assert!(err.contains("non-finite") && err.contains("step"), "{err}");
    assert!(
        !r.sink.metrics.is_empty(),
        "steps before the failure stay recorded"
    );
}

#[test]
fn hyperparameters_are_validated_by_name() {
    let err = jobs::effective_hyperparameters(JobKind::Sft, &json!({"lrr": 1e-5})).unwrap_err();
    assert!(err.contains("`lrr`") && err.contains("lr"), "{err}");
    let err = jobs::effective_hyperparameters(JobKind::Dpo, &json!({"beta": "high"})).unwrap_err();
    assert!(err.contains("`beta`"), "{err}");
    let err = jobs::effective_hyperparameters(JobKind::Dpo, &json!({"beta": -1.0})).unwrap_err();
    assert!(err.contains("beta"), "{err}");
    let eff = jobs::effective_hyperparameters(JobKind::Dpo, &json!({})).unwrap();
    assert_eq!(
        (
            eff["beta"].as_f64(),
            eff["nll_weight"].as_f64(),
            eff["lr"].as_f64(),
            eff["mask_format_tokens"].as_bool()
        ),
        (Some(0.1), Some(0.2), Some(1e-5), Some(true))
    );
    assert_eq!(
        jobs::effective_hyperparameters(JobKind::Sample, &json!({})).unwrap()["k"],
        10
    );
    let inputs = BTreeMap::from([("model".to_string(), "x".to_string())]);
    assert!(jobs::check_inputs(JobKind::Sft, &inputs)
        .unwrap_err()
        .contains("`data`"));
}

/// SFT on a plain-text corpus: language modelling on every token (no chat
/// format), and the loss falls.
#[test]
fn sft_on_plain_text_learns_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let rows: String = (0..4)
        .map(|i| format!("{{\"text\": \"the cat sat on the mat {i}\"}}\n"))
        .collect();
    std::fs::write(&corpus, rows).unwrap();
    let r = run(
        JobKind::Sft,
        json!({"steps": 12, "lr": 3e-3, "batch_size": 4}),
        0,
        &[("model", &fixtures().join("ref")), ("data", &corpus)],
        dir.path(),
    );
    r.summary.unwrap();
    let loss = r.sink.series("loss");
    assert!(
        loss.last().unwrap() < &(loss[0] * 0.7),
        "loss should fall on a repeated text: {loss:?}"
    );
    // Every text token is a target, as encode_text marks them.
    let chat =
        herd_engine::chat::ChatFormat::from_file(&fixtures().join("ref/tokenizer.json")).unwrap();
    let targets: usize = (0..4)
        .map(|i| {
            let e = chat
                .encode_text(&format!("the cat sat on the mat {i}"))
                .unwrap();
            assert_eq!(
                e.target_mask.iter().filter(|m| **m == 1).count(),
                e.len() - 1
            );
            e.len() - 1
        })
        .sum();
    assert_eq!(r.sink.series("tokens")[0], targets as f64);
}

/// max |a - b| over two tensors of one shape.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The directory of a job's output `name` (a tree in the sink's store).
fn output_dir(r: &Run, scratch: &Path, name: &str) -> PathBuf {
    let hash = r.sink.output_hash(name).expect("the job made that output");
    let dir = scratch.join(format!("out-{hash}"));
    if !dir.exists() {
        r.sink.blobs.materialize(hash, &dir).unwrap();
    }
    dir
}

/// LoRA as jobs: sft and rm train adapters of a frozen base (rm's carries
/// its score head), the same seed gives the same adapter with dropout on,
/// averaging two adapters gives exactly the average of the two merged
/// models, and merge turns an adapter into a plain checkpoint.
#[test]
fn lora_jobs_train_average_and_merge_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    let model = small_model(s, 3);
    let rows: Vec<Value> = (0..6)
        .map(|i| {
            let (q, a, _) = qa(i);
            json!({"prompt": q, "completion": a})
        })
        .collect();
    let data = write(s, "sft.jsonl", &rows);
    let sft = |seed: u64, dropout: f64| {
        let hp = json!({"lr": 1e-2, "steps": 3, "batch_size": 2, "lora_rank": 4, "lora_alpha": 8.0,
                        "lora_dropout": dropout, "lora_targets": ["q_proj", "v_proj", "down_proj"]});
        let r = run(
            JobKind::Sft,
            hp,
            seed,
            &[("model", &model), ("data", &data)],
            s,
        );
        r.summary.as_ref().unwrap();
        assert!(r.sink.output_hash("checkpoint").is_none());
        r
    };
    let (a, b) = (sft(1, 0.0), sft(2, 0.0));
    // Dropout draws from the job's seed: the same run twice is the same.
    let (d1, d2) = (sft(1, 0.3), sft(1, 0.3));
    assert_eq!(
        d1.sink.output_hash("adapter"),
        d2.sink.output_hash("adapter")
    );
    assert_ne!(
        d1.sink.output_hash("adapter"),
        a.sink.output_hash("adapter")
    );
    assert!(a.sink.series("loss").last() < a.sink.series("loss").first());

    let merged_of = |adapters: &[&Path]| {
        let mut m = herd_engine::checkpoint::load_model(&model, &candle_core::Device::Cpu).unwrap();
        let mut sum: Option<BTreeMap<String, candle_core::Tensor>> = None;
        for dir in adapters {
            herd_engine::checkpoint::load_adapter(&mut m, dir).unwrap();
            let t = m.merged_tensors().unwrap();
            sum = Some(match sum {
                None => t,
                Some(acc) => acc
                    .into_iter()
                    .map(|(k, v)| {
                        let x = (&v + &t[&k]).unwrap();
                        (k, x)
                    })
                    .collect(),
            });
        }
        let n = adapters.len() as f64;
        sum.unwrap()
            .into_iter()
            .map(|(k, v)| (k, (v / n).unwrap()))
            .collect::<BTreeMap<_, _>>()
    };
    let (da, db) = (output_dir(&a, s, "adapter"), output_dir(&b, s, "adapter"));
    let avg = run(JobKind::Average, json!({}), 0, &[("a", &da), ("b", &db)], s);
    avg.summary.as_ref().unwrap();
    assert!(avg.sink.output_hash("checkpoint").is_none());
    let davg = output_dir(&avg, s, "adapter");
    let config =
        herd_engine::lora::LoraConfig::from_file(&davg.join("adapter_config.json")).unwrap();
    assert_eq!(config.rank, 8, "ranks add up");
    let (want, got) = (merged_of(&[&da, &db]), merged_of(&[&davg]));
    for (name, w) in &want {
        let diff = max_diff(w, &got[name]);
        assert!(
            diff < 1e-6,
            "{name}: the averaged adapter's merge is off by {diff}"
        );
    }
    // An adapter and a checkpoint do not average.
    let mixed = run(
        JobKind::Average,
        json!({}),
        0,
        &[("a", &da), ("b", &model)],
        s,
    );
    assert!(format!("{:#}", mixed.summary.unwrap_err()).contains("one kind"));

    // merge: the same weights as the engine's merge, as a plain checkpoint.
    let merge = run(
        JobKind::Merge,
        json!({}),
        0,
        &[("model", &model), ("adapter", &davg)],
        s,
    );
    merge.summary.as_ref().unwrap();
    let plain =
        herd_engine::checkpoint::load_tensors(&output_dir(&merge, s, "checkpoint")).unwrap();
    for (name, w) in &got {
        let diff = max_diff(w, &plain[name]);
        assert!(diff < 1e-6, "{name}: {diff}");
    }

    // rm with LoRA: the adapter carries the score head; merged, a reward model.
    let prefs: Vec<Value> = (0..6)
        .map(|i| {
            let (q, good, bad) = qa(i);
            json!({"prompt": q, "chosen": good, "rejected": bad})
        })
        .collect();
    let prefs = write(s, "prefs.jsonl", &prefs);
    let rm = run(
        JobKind::Rm,
        json!({"steps": 2, "batch_size": 2, "lora_rank": 2, "heldout_fraction": 0.0}),
        0,
        &[("model", &model), ("data", &prefs)],
        s,
    );
    rm.summary.as_ref().unwrap();
    let drm = output_dir(&rm, s, "adapter");
    let names = herd_engine::lora::load_tensors(&drm).unwrap();
    assert!(names.contains_key(herd_engine::lora::SCORE_TENSOR));
    // rm may go on from a language model's adapter: A and B carry over, the
    // score head starts fresh and is saved with them.
    let rm_from_sft = run(
        JobKind::Rm,
        json!({"steps": 1, "batch_size": 2, "heldout_fraction": 0.0}),
        0,
        &[("model", &model), ("data", &prefs), ("adapter", &da)],
        s,
    );
    rm_from_sft.summary.as_ref().unwrap();
    let continued = output_dir(&rm_from_sft, s, "adapter");
    let config =
        herd_engine::lora::LoraConfig::from_file(&continued.join("adapter_config.json")).unwrap();
    assert!(config.score && config.rank == 4);
    let merged_rm = run(
        JobKind::Merge,
        json!({}),
        0,
        &[("model", &model), ("adapter", &drm)],
        s,
    );
    merged_rm.summary.as_ref().unwrap();
    let cfg = herd_engine::LlamaConfig::from_file(
        &output_dir(&merged_rm, s, "checkpoint").join("config.json"),
    )
    .unwrap();
    assert_eq!(
        cfg.num_labels, 1,
        "a reward model's adapter merges into a reward model"
    );
}

/// `activation_checkpointing` changes memory, not the numbers: the fixture
/// runs of sft and dpo (LoRA with dropout too) give the same losses and
/// gradient norms with it.
#[test]
fn activation_checkpointing_keeps_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let cases: Vec<(JobKind, Value, Vec<(&str, PathBuf)>)> = vec![
        (
            JobKind::Sft,
            json!({"steps": 3, "batch_size": 2, "lr": 1e-3}),
            vec![("model", f.join("ref")), ("data", f.join("sft.jsonl"))],
        ),
        (
            JobKind::Dpo,
            json!({"steps": 2, "batch_size": 2, "lr": 1e-3, "lora_rank": 4, "lora_dropout": 0.2,
                   "min_strength": "slightly_better"}),
            vec![
                ("model", f.join("ref")),
                ("data", f.join("preferences.jsonl")),
            ],
        ),
    ];
    for (kind, hp, inputs) in cases {
        let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(n, p)| (*n, p.as_path())).collect();
        let series = |on: bool| {
            let mut hp = hp.clone();
            hp["activation_checkpointing"] = on.into();
            let r = run(kind, hp, 7, &inputs, dir.path());
            r.summary.unwrap();
            (r.sink.series("loss"), r.sink.series("grad_norm"))
        };
        let (plain, recomputed) = (series(false), series(true));
        for (a, b) in plain
            .0
            .iter()
            .chain(&plain.1)
            .zip(recomputed.0.iter().chain(&recomputed.1))
        {
            close(*b, *a, &format!("{kind} with activation checkpointing"));
        }
    }
}

/// `dtype=bf16` jobs: the fixture's first losses within 1% of f32's, for
/// full fine-tuning (written back as f32 weights) and LoRA (an f32 adapter).
#[test]
fn bf16_jobs_stay_near_f32() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let e = expected();
    let inputs = [("model", f.join("ref")), ("data", f.join("sft.jsonl"))];
    let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(n, p)| (*n, p.as_path())).collect();
    for lora_rank in [0, 4] {
        let hp = json!({"steps": 2, "batch_size": 3, "dtype": "bf16", "lora_rank": lora_rank});
        let r = run(JobKind::Sft, hp, 0, &inputs, dir.path());
        r.summary.as_ref().unwrap();
        let (got, want) = (first(&r.sink, "loss"), e["sft"]["loss"].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 0.01 * want,
            "bf16 lora_rank={lora_rank}: {got} vs {want}"
        );
        let out = if lora_rank > 0 {
            "adapter"
        } else {
            "checkpoint"
        };
        let dir = output_dir(&r, dir.path(), out);
        let file = if lora_rank > 0 {
            "adapter_model.safetensors"
        } else {
            "model.safetensors"
        };
        let tensors =
            candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap();
        assert!(
            tensors
                .values()
                .all(|t| t.dtype() == candle_core::DType::F32),
            "{out} saved in f32"
        );
    }
}
