//! The README's main job, in its smoke size: the whole system end to end.

use herd::quickstart::{run, table, Options};

#[test]
fn quickstart_smoke_runs_rounds_reproduces_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(dir.path().join("data")),
        rounds: 2,
        worker_command: vec![env!("CARGO_BIN_EXE_herdd").to_string(), "worker".into()],
        quiet: true,
        model: None,
        lora_rank: None,
        method: herd::quickstart::Method::Llama3,
    };
    let report = run(&opts).unwrap();
    eprintln!("{}", table(&report));
    assert_eq!(report.rounds.len(), 2);
    for r in &report.rounds {
        assert_eq!(
            r.jobs, 11,
            "annotate, curate, mix, curate, rm, sample, sft, dpo x2, average, eval"
        );
        assert_eq!(r.succeeded, r.jobs);
        assert!((0.0..=1.0).contains(&r.task_accuracy) && (0.0..=1.0).contains(&r.win_rate));
    }
    // Each round's reward model trains on every round's preferences so far:
    // $all_preferences expanded to round 1's annotations (by hash), beside
    // round 2's own.
    let (r1, r2) = (&report.rounds[0], &report.rounds[1]);
    assert_eq!(r1.rm_data_inputs.keys().collect::<Vec<_>>(), ["new"]);
    assert_eq!(
        r2.rm_data_inputs.keys().collect::<Vec<_>>(),
        ["earlier_r0", "new"]
    );
    assert_eq!(r2.rm_data_inputs["earlier_r0"], r1.annotations);
    assert!(r2.rm_data_inputs["new"].starts_with("job:"));
    assert_ne!(r1.annotations, r2.annotations);
    // Round 2 started from round 1's final policy: its baseline is round 1's result.
    assert_eq!(
        report.rounds[1].previous_accuracy,
        report.rounds[0].task_accuracy
    );
    assert!(
        report.reproduced_identical,
        "reproduced round has identical output hashes"
    );
    assert!(report.store_verified);
}

/// `--model DIR`: the same loop on a Hugging Face directory herd did not
/// build (the Qwen2 fixture: its own ChatML template, tokens and class),
/// with LoRA adapters merged after each training job.
#[test]
fn quickstart_runs_on_a_users_model_with_lora() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(dir.path().join("data")),
        rounds: 1,
        worker_command: vec![env!("CARGO_BIN_EXE_herdd").to_string(), "worker".into()],
        quiet: true,
        model: Some(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/families/qwen2"),
        ),
        lora_rank: Some(4),
        method: herd::quickstart::Method::Llama3,
    };
    let report = run(&opts).unwrap();
    eprintln!("{}", table(&report));
    let r = &report.rounds[0];
    assert_eq!(
        r.jobs, 14,
        "annotate, curate, mix, curate, rm, sample, sft, dpo x2, merges of rm and sft, average, its merge, eval"
    );
    assert_eq!(r.succeeded, r.jobs);
    assert!(report.reproduced_identical && report.store_verified);
}

/// `--method grpo`: each round one `grpo` job rewarded by the task's
/// checker, then `eval`; the round reproduces bit for bit.
#[test]
fn quickstart_grpo_rounds_run_and_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(dir.path().join("data")),
        rounds: 1,
        worker_command: vec![env!("CARGO_BIN_EXE_herdd").to_string(), "worker".into()],
        quiet: true,
        model: None,
        lora_rank: None,
        method: herd::quickstart::Method::Grpo,
    };
    let report = run(&opts).unwrap();
    eprintln!("{}", table(&report));
    let r = &report.rounds[0];
    assert_eq!((r.jobs, r.succeeded), (2, 2), "grpo and eval");
    assert!((0.0..=1.0).contains(&r.reward), "mean reward {}", r.reward);
    assert!((0.0..=1.0).contains(&r.task_accuracy));
    assert!(
        report.reproduced_identical,
        "the grpo round reproduces bit for bit"
    );
    assert!(report.store_verified);
}
