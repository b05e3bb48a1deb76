//! Rounds through the CLI: the example spec as written, `watch`, sweeps.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// `examples/round.json` runs as written: a whole round (rm, rejection
/// sampling, sft, dpo, averaging) with the experiment by name and the
/// variables given on the command line; `herd kinds` describes each job.
#[test]
fn the_example_round_spec_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let hash = |args: &[&str]| cli.quiet(args);
    let policy = hash(&["import", "model", f.join("policy").to_str().unwrap()]);
    let prefs = hash(&[
        "import",
        "dataset",
        f.join("preferences.jsonl").to_str().unwrap(),
        "--kind",
        "preference",
    ]);
    let prompts_file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts_file,
        "{\"prompt\": \"What is 2+3?\"}\n{\"prompt\": \"Name a colour.\"}\n",
    )
    .unwrap();
    let prompts = hash(&[
        "import",
        "dataset",
        prompts_file.to_str().unwrap(),
        "--kind",
        "prompts",
    ]);
    hash(&["experiment", "create", "my-experiment"]);
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/round.json");
    let round = cli.json(&[
        "round",
        "submit",
        spec.to_str().unwrap(),
        "--var",
        &format!("policy={policy}"),
        "--var",
        &format!("prefs={prefs}"),
        "--var",
        &format!("prompts={prompts}"),
        "--wait",
    ]);
    let jobs = round["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5, "{round}");
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{round}");
    // The round by EXPERIMENT/INDEX, a job by EXPERIMENT/ROUND/NAME.
    assert_eq!(
        cli.json(&["round", "show", "my-experiment/0"])["round"]["id"],
        round["round"]["id"]
    );
    let dpo = cli.json(&["show", "my-experiment/0/dpo"]);
    assert_eq!(dpo["kind"], "dpo");

    let kinds = cli.json(&["kinds"]);
    assert_eq!(
        kinds.as_array().unwrap().len(),
        13,
        "one per recipe, merge, generate, chat_format and grpo included"
    );
    let mix = cli.json(&["kinds", "mix"]);
    assert_eq!(mix[0]["at_least"], 1);
    assert_eq!(
        mix[0]["at_least_accepts"],
        json!(["sft", "preference", "prompts"])
    );
    let dpo_kind = cli.json(&["kinds", "dpo"]);
    assert_eq!(dpo_kind[0]["hyperparameters"]["beta"], 0.1);
    assert_eq!(dpo_kind[0]["ranges"]["beta"], "(0, ∞)");
    assert_eq!(dpo_kind[0]["ranges"]["batch_size"], "[1, 4096]");
    assert!(dpo_kind[0]["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["name"] == "reference_logps"));
    let human = cli.raw(&["kinds", "sample"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("prompts (prompts)") && text.contains("data (sft)"),
        "{text}"
    );
}

/// `herd watch` shows queued jobs, keeps finished ones as final lines, and
/// catches a job that ran entirely between two of its looks.
#[test]
fn watch_sees_fast_and_queued_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--cpu-jobs", "2"]);
    let cli = Cli { d: &d };
    let f = fixtures();
    let q = |args: &[&str]| cli.quiet(args);
    let model = q(&["import", "model", f.join("ref").to_str().unwrap()]);
    let sft = q(&[
        "import",
        "dataset",
        f.join("sft.jsonl").to_str().unwrap(),
        "--kind",
        "sft",
    ]);
    let job = |name: &str, steps: &str| {
        q(&[
            "submit",
            "--kind",
            "sft",
            "--name",
            name,
            "--input",
            &format!("model={model}"),
            "--input",
            &format!("data={sft}"),
            "--set",
            &format!("steps={steps}"),
        ])
    };
    let long = job("long", "100000");
    // Watch while the long job runs (plain lines: stderr is not a terminal).
    let watcher = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "--server",
            &d.addr,
            "--data-dir",
            d.dir.to_str().unwrap(),
            "watch",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let fast = job("fast", "1");
    cli.json(&["wait", &fast]);
    std::thread::sleep(std::time::Duration::from_millis(700));
    q(&["cancel", &long]);
    let out = watcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sft fast: succeeded"), "{err}");
    assert!(
        err.contains("sft long: running") && err.contains("sft long: cancelled"),
        "{err}"
    );
}

#[test]
fn a_sweep_is_a_round_on_the_local_executor_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--cpu-jobs", "2"]);
    let cli = Cli { d: &d };
    let c = d.client();
    let (r, _, _, _, sft) = common::import_fixtures(&c);
    cli.quiet(&["experiment", "create", "grid"]);
    let (model, data) = (format!("model={r}"), format!("data={sft}"));
    let base = [
        "sweep",
        "--experiment",
        "grid",
        "--kind",
        "sft",
        "--input",
        &model,
        "--input",
        &data,
        "--set",
        "batch_size=2",
        "--set",
        "steps=2",
    ];
    // What is wrong is said before anything is recorded.
    for (extra, says) in [
        (vec![], "at least one --grid"),
        (
            vec!["--grid", "lr=1e-5,1e-3", "--average-top", "1"],
            "--by metric.NAME go together",
        ),
        (
            vec![
                "--grid",
                "lr=1e-5,1e-3",
                "--average-top",
                "3",
                "--by",
                "metric.loss",
            ],
            "between 1 and the 2 points",
        ),
        (
            vec!["--grid", "steps=1,2"],
            "steps is both --set and --grid",
        ),
        (vec!["--grid", "lr=1e-5,1e-5"], "1e-5 is listed twice"),
    ] {
        let out = cli.raw(&[&base[..], &extra[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
    assert!(c.jobs(&Default::default()).unwrap().is_empty());
    let round = cli.json(
        &[
            &base[..],
            &[
                "--grid",
                "lr=1e-5,1e-3",
                "--average-top",
                "1",
                "--by",
                "metric.loss",
                "--wait",
            ],
        ]
        .concat(),
    );
    let jobs = round["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    let loss = |j: &Value| j["last_metrics"]["loss"][1].as_f64().unwrap();
    let best = if loss(&jobs[0]) <= loss(&jobs[1]) {
        &jobs[0]
    } else {
        &jobs[1]
    };
    let avg = &jobs[2];
    assert_eq!(avg["status"], "succeeded", "{avg}");
    assert_eq!(
        avg["resolved_inputs"],
        json!({best["name"].as_str().unwrap(): best["outputs"]["checkpoint"]})
    );
    assert!(
        avg["summary"]["notes"][0]
            .as_str()
            .unwrap()
            .starts_with("top 1 of 2 by metric.loss (lowest first)"),
        "{avg}"
    );
    // Each point's hyperparameters are recorded as given; the seed is shared.
    assert_eq!(jobs[1]["hyperparameters"]["lr"], json!(1e-3));
    assert_eq!(jobs[0]["seed"], jobs[1]["seed"]);
    // Points are named by their values as typed; the round says which the
    // average left out.
    assert_eq!(jobs[0]["name"], "sft_lr1e-5");
    assert_eq!(jobs[1]["name"], "sft_lr1e-3");
    let worst = if std::ptr::eq(best, &jobs[0]) {
        &jobs[1]
    } else {
        &jobs[0]
    };
    let round_id = round["round"]["id"].as_str().unwrap();
    let shown = cli.text(&["round", "show", round_id]);
    let line = |name: &str| {
        shown
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} in {shown}"))
            .to_string()
    };
    let worst_name = worst["name"].as_str().unwrap();
    assert!(
        line(worst_name).ends_with("(not kept by average)"),
        "{shown}"
    );
    assert!(
        !line(best["name"].as_str().unwrap()).contains("not kept"),
        "{shown}"
    );
}
