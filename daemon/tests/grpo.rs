//! The `grpo` recipe run in-process: a verifiable reward rises, runs
//! reproduce bit for bit, every rollout is recorded, a reward model and
//! LoRA with a KL to the adapter-off reference work, bad settings are
//! refused by name.

mod common;

use common::*;
use herd_daemon::jobs::{self, JobKind};
use serde_json::{json, Value};

/// Prompts whose completions the `format` rule below rewards when they
/// start with a lower-case letter: a behaviour a random model shows
/// sometimes, so there is something to reinforce.
fn prompts(dir: &std::path::Path) -> std::path::PathBuf {
    let rows: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("Say something ({i})."), "answer": "a"}))
        .collect();
    write(dir, "prompts.jsonl", &rows)
}

fn rollouts(r: &Run) -> Vec<Value> {
    output_text(&r.sink, "rollouts")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_verifiable_reward_rises_and_runs_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 3);
    let data = prompts(dir.path());
    let hp = json!({
        "steps": 12, "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 6,
        "lr": 3e-2, "batch_size": 16, "temperature": 1.0,
        "verifier_rule": "format", "verifier_pattern": "(?s)\\s*[a-z].*",
    });
    let inputs = [("policy", model.as_path()), ("prompts", data.as_path())];
    let a = run(JobKind::Grpo, hp.clone(), 11, &inputs, dir.path());
    let summary = a.summary.as_ref().unwrap();
    let reward = a.sink.series("reward");
    let (early, late) = (
        reward[..3].iter().sum::<f64>() / 3.0,
        reward[9..].iter().sum::<f64>() / 3.0,
    );
    assert!(
        late > early + 0.2,
        "the verifier's reward did not rise: {reward:?}"
    );
    for m in [
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completion_length/mean",
        "frac_reward_zero_std",
        "reward/verifier_mean",
        "tokens_per_s",
        "grad_norm",
    ] {
        assert_eq!(a.sink.series(m).len(), 12, "metric {m} every step");
    }
    assert_eq!(summary["rollouts"], 12 * 32);
    // Every completion is recorded, with its group's advantages centred.
    let rows = rollouts(&a);
    assert_eq!(rows.len(), 12 * 32);
    for row in &rows {
        for key in [
            "step",
            "group",
            "index",
            "prompt",
            "completion",
            "rewards",
            "reward",
            "advantage",
            "logprob",
            "tokens",
            "truncated",
        ] {
            assert!(
                !row[key].is_null() || key == "logprob",
                "rollout lacks {key}: {row}"
            );
        }
    }
    let group: f64 = rows[..8]
        .iter()
        .map(|r| r["advantage"].as_f64().unwrap())
        .sum();
    assert!(
        group.abs() < 1e-3,
        "advantages of a group sum to 0, got {group}"
    );
    // Same inputs, seed and threads: the same checkpoint and rollouts.
    let b = run(JobKind::Grpo, hp, 11, &inputs, dir.path());
    b.summary.unwrap();
    for out in ["checkpoint", "rollouts"] {
        assert_eq!(
            a.sink.output_hash(out),
            b.sink.output_hash(out),
            "{out} differs between runs"
        );
    }
}

#[test]
fn a_reward_model_lora_kl_and_reused_rollouts_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    let data = prompts(dir.path());
    let hp = json!({
        "steps": 2, "prompts_per_step": 2, "group_size": 3, "max_new_tokens": 5,
        "lr": 1e-3, "batch_size": 4, "beta": 0.04, "num_iterations": 2,
        "epsilon_high": 0.28, "loss_type": "grpo", "advantage": "rloo",
        "lora_rank": 4, "verifier_rule": "regex", "verifier_pattern": "{answer}",
        "reward_weights": [1.0, 0.5], "mask_truncated_completions": true,
    });
    let ref_dir = f.join("ref");
    let rm_dir = f.join("rm");
    let r = run(
        JobKind::Grpo,
        hp,
        4,
        &[
            ("policy", ref_dir.as_path()),
            ("prompts", data.as_path()),
            ("rm", rm_dir.as_path()),
        ],
        dir.path(),
    );
    let summary = r.summary.as_ref().unwrap();
    assert!(
        r.sink.output_hash("adapter").is_some(),
        "LoRA makes an adapter: {summary}"
    );
    assert!(r.sink.output_hash("checkpoint").is_none());
    let rows = rollouts(&r);
    // A step whose completions were all cut short trains nothing (masked):
    // it logs no KL.
    let trained: std::collections::BTreeSet<u64> = rows
        .iter()
        .filter(|x| x["truncated"] == false)
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    assert_eq!(r.sink.series("kl").len(), trained.len());
    assert!(
        !trained.is_empty(),
        "some completion ended: the test trains"
    );
    assert_eq!(rows.len(), 2 * 6);
    assert!(rows
        .iter()
        .all(|x| x["rewards"]["rm"].is_number() && x["rewards"]["verifier"].is_number()));
    for x in &rows {
        let want =
            x["rewards"]["verifier"].as_f64().unwrap() + 0.5 * x["rewards"]["rm"].as_f64().unwrap();
        assert!((x["reward"].as_f64().unwrap() - want).abs() < 1e-5, "{x}");
    }
}

#[test]
fn bad_settings_are_refused_with_their_range() {
    for (hp, says) in [
        (json!({"group_size": 1}), "group_size must be in [2,"),
        (json!({"epsilon": 0}), "epsilon must be in (0, 10)"),
        (
            json!({"num_iterations": 0}),
            "num_iterations must be in [1,",
        ),
        (json!({"temperature": 0}), "temperature must be in (0, 100]"),
        (
            json!({"loss_type": "ppo"}),
            "loss_type \"ppo\" is not one of grpo, bnpo, dr_grpo, dapo",
        ),
        (
            json!({"verifier_rule": "fuzzy"}),
            "is not one of exact, number, regex, format",
        ),
        (
            json!({"verifier_rule": "format", "verifier_pattern": "(oops"}),
            "not a regular expression",
        ),
    ] {
        let err = jobs::effective_hyperparameters(JobKind::Grpo, &hp).unwrap_err();
        assert!(err.contains(says), "{hp}: {err}");
    }
    let recipe = jobs::recipe(JobKind::Grpo).unwrap();
    let none = jobs::effective_hyperparameters(JobKind::Grpo, &json!({})).unwrap();
    let err = recipe
        .check_with_inputs(&none, &["policy", "prompts"])
        .unwrap_err();
    assert!(err.contains("grpo needs a reward"), "{err}");
    assert!(recipe
        .check_with_inputs(&none, &["policy", "prompts", "rm"])
        .is_ok());
    // A rule that reads `answer` refuses prompts without one, naming the row.
    let dir = tempfile::tempdir().unwrap();
    let model = small_model(dir.path(), 1);
    let data = write(
        dir.path(),
        "p.jsonl",
        &[
            json!({"prompt": "a", "answer": "1"}),
            json!({"prompt": "b"}),
        ],
    );
    let r = run(
        JobKind::Grpo,
        json!({"steps": 1, "verifier_rule": "exact"}),
        0,
        &[("policy", model.as_path()), ("prompts", data.as_path())],
        dir.path(),
    );
    let err = format!("{:#}", r.summary.unwrap_err());
    assert!(err.contains("row 2") && err.contains("answer"), "{err}");
}
