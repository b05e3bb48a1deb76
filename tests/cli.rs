//! The `herd` CLI against a real daemon: every command, `--json` parsed.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

struct Cli<'a> {
    d: &'a Daemon,
}

impl Cli<'_> {
    fn raw(&self, args: &[&str]) -> std::process::Output {
        self.d.herd(args)
    }
    /// `herd -q ARGS`, which must succeed: the id or hash it prints.
    fn quiet(&self, args: &[&str]) -> String {
        let out = self.raw(&[&["-q"], args].concat());
        assert!(
            out.status.success(),
            "herd -q {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.raw(&a);
        assert!(
            out.status.success(),
            "herd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "herd {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// Whether an SVG has a text element saying exactly `t`.
fn svg_text(svg: &str, t: &str) -> bool {
    svg.contains(&format!(">{t}<")) || svg.contains(&format!(">\n{t}\n<"))
}

#[test]
fn every_command_with_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let exp = cli.json(&["experiment", "create", "cli-test"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        cli.json(&["experiment", "list"]).as_array().unwrap().len(),
        1
    );
    let m = cli.json(&["import", "model", f.join("ref").to_str().unwrap()]);
    assert!(m["summary"]["parameters"].as_u64().unwrap() > 0);
    let r = m["hash"].as_str().unwrap().to_string();
    let p = cli.json(&["import", "model", f.join("policy").to_str().unwrap()])["hash"]
        .as_str()
        .unwrap()
        .to_string();
    let prefs = cli.json(&[
        "import",
        "dataset",
        f.join("preferences.jsonl").to_str().unwrap(),
        "--kind",
        "preference",
    ]);
    assert_eq!(prefs["summary"]["rows"], 3);
    assert_eq!(prefs["summary"]["strength"]["better"], 1);
    let prefs = prefs["hash"].as_str().unwrap().to_string();
    let sft = cli.json(&[
        "import",
        "dataset",
        f.join("sft.jsonl").to_str().unwrap(),
        "--kind",
        "sft",
    ])["hash"]
        .as_str()
        .unwrap()
        .to_string();

    let j1 = cli.json(&[
        "submit",
        "--kind",
        "sft",
        "--input",
        &format!("model={r}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "steps=2",
        "--set",
        "lr=1e-4",
        "--experiment",
        &exp,
        "--wait",
    ]);
    assert_eq!(j1["status"], "succeeded");
    let j2 = cli.json(&[
        "submit",
        "--kind",
        "sft",
        "--input",
        &format!("model={r}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "steps=2",
        "--set",
        "lr=1e-5",
        "--experiment",
        &exp,
        "--wait",
    ]);
    let (id1, id2) = (j1["id"].as_str().unwrap(), j2["id"].as_str().unwrap());
    let shown = cli.json(&["show", id1]);
    assert_eq!(shown["effective_hyperparameters"]["lr"], 1e-4);
    assert_eq!(shown["resolved_inputs"]["model"], r.as_str());
    // History with filters and sorting.
    let h = cli.json(&[
        "history",
        "--experiment",
        &exp,
        "--kind",
        "sft",
        "--where",
        "hp.lr<5e-5",
    ]);
    assert_eq!(h.as_array().unwrap().len(), 1);
    assert_eq!(h[0]["id"], id2);
    let h = cli.json(&["history", "--kind", "sft", "--sort", "-hp.lr"]);
    assert_eq!(h[0]["id"], id1);
    // Lineage back to the base model and data.
    let ckpt = shown["outputs"]["checkpoint"].as_str().unwrap().to_string();
    let l = cli.json(&["lineage", &ckpt]);
    assert_eq!(l["job"]["inputs"]["model"]["hash"], r.as_str());
    assert_eq!(l["job"]["inputs"]["data"]["hash"], sft.as_str());
    // A plot with the requested series.
    let svg_path = dir.path().join("loss.svg");
    let plot = cli.json(&[
        "plot",
        id1,
        "--metric",
        "loss",
        "--metric",
        "grad_norm",
        "--out",
        svg_path.to_str().unwrap(),
    ]);
    assert_eq!(plot["metrics"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.matches("<polyline").count() >= 2,
        "a line per metric panel"
    );
    assert!(
        svg_text(&svg, "loss") && svg_text(&svg, "grad_norm"),
        "a panel per metric"
    );
    // Diff of two jobs: lr differs, inputs the same.
    let diff = cli.json(&["diff", id1, id2]);
    let rows = diff[0]["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["key"] == "lr" && r["same"] == false));
    assert!(rows
        .iter()
        .any(|r| r["key"] == "model" && r["same"] == true));
    // Reproduce a job: identical hashes.
    let rep = cli.json(&["reproduce", id1]);
    assert_eq!(rep["identical"], true, "{rep}");
    // A multi-job round from a spec file, then its reproduction.
    let spec = json!({"experiment": exp, "seed": 3, "vars": {"policy": p, "prefs": prefs, "sft": sft}, "final_policy": "average.checkpoint",
        "jobs": [
            {"name": "sft", "kind": "sft", "inputs": {"model": "$policy", "data": "$sft"}, "hyperparameters": {"steps": 2}},
            {"name": "dpo", "kind": "dpo", "inputs": {"model": "sft.checkpoint", "data": "$prefs"}, "hyperparameters": {"steps": 2}},
            {"name": "average", "kind": "average", "inputs": {"a": "sft.checkpoint", "b": "dpo.checkpoint"}}]});
    let spec_path = dir.path().join("round.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let round = cli.json(&["round", "submit", spec_path.to_str().unwrap(), "--wait"]);
    let round_id = round["round"]["id"].as_str().unwrap().to_string();
    assert!(
        round["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["status"] == "succeeded"),
        "{round}"
    );
    let rep = cli.json(&["reproduce", &round_id]);
    assert_eq!(rep["identical"], true, "{rep}");
    assert_eq!(rep["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(
        cli.json(&["round", "show", &round_id])["jobs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let rd = cli.json(&["diff", &round_id, &round_id]);
    assert_eq!(rd.as_array().unwrap().len(), 3);
    // Export round-trips: import gives the same tree hash.
    let out = dir.path().join("exported");
    cli.json(&["export", &ckpt, out.to_str().unwrap()]);
    assert_eq!(
        cli.json(&["import", "model", out.to_str().unwrap()])["hash"],
        ckpt.as_str()
    );
    // Watch of a finished job returns; wait, cancel of an ended job, verify, status.
    assert!(cli.raw(&["watch", id1]).status.success());
    assert_eq!(cli.json(&["wait", id1])[0]["status"], "succeeded");
    assert!(!cli.raw(&["cancel", id1]).status.success());
    assert_eq!(cli.json(&["verify"])["ok"], true);
    assert!(cli.json(&["status"])["devices"].as_array().is_some());
    let comp = cli.raw(&["completions", "bash"]);
    assert!(comp.status.success() && String::from_utf8_lossy(&comp.stdout).contains("herd"));
}

#[test]
fn errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let one_line = |out: std::process::Output, want: &str| {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("herd: ") && err.contains(want), "{err}");
    };
    one_line(
        cli.raw(&["show", "01a22000-0000-7000-8000-000000000000"]),
        "no job",
    );
    // The user's own path in the error, not the daemon's.
    let half = dir.path().join("half-model");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("config.json"), "{}").unwrap();
    one_line(
        cli.raw(&["import", "model", half.to_str().unwrap()]),
        &format!("{}: a checkpoint needs tokenizer.json", half.display()),
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{nope").unwrap();
    one_line(
        cli.raw(&["round", "submit", bad.to_str().unwrap()]),
        "not valid JSON",
    );
    let wrong = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["--server", &d.addr, "--token", "wrong", "status"])
        .output()
        .unwrap();
    one_line(wrong, "token");
    let down = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["--server", "http://127.0.0.1:9", "--token", "x", "status"])
        .output()
        .unwrap();
    one_line(down, "cannot reach herdd");
}

/// What a new user meets: names instead of ids, `-q` for scripts, a closed
/// pipe, tables with the columns that matter, artifacts to look at and
/// export, errors that say what to do.
#[test]
fn names_quiet_output_tables_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let text = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fails = |out: std::process::Output, want: &str| {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(want), "wanted {want:?} in: {err}");
    };

    // -q prints just the hash or id.
    let model = text(cli.raw(&["-q", "import", "model", f.join("ref").to_str().unwrap()]));
    let model = model.trim().to_string();
    assert_eq!(model.len(), 64, "{model}");
    let sft_file = f.join("sft.jsonl");
    let sft = text(cli.raw(&[
        "-q",
        "import",
        "dataset",
        sft_file.to_str().unwrap(),
        "--kind",
        "sft",
    ]));
    let sft = sft.trim().to_string();
    assert_eq!(sft.len(), 64);
    let exp = text(cli.raw(&["-q", "experiment", "create", "names-exp"]));
    assert!(exp.trim().parse::<uuid::Uuid>().is_ok(), "{exp}");

    // Experiment names are unique, and work wherever an id does.
    fails(cli.raw(&["experiment", "create", "names-exp"]), "exists");
    assert_eq!(
        cli.json(&["experiment", "show", "names-exp"])["experiment"]["id"],
        exp.trim()
    );
    fails(
        cli.raw(&["experiment", "show", "nope"]),
        "no experiment named \"nope\"",
    );
    let submit = |name: &str, lr: &str| {
        let out = cli.raw(&[
            "-q",
            "submit",
            "--kind",
            "sft",
            "--input",
            &format!("model={model}"),
            "--input",
            &format!("data={sft}"),
            "--set",
            "steps=1",
            "--set",
            &format!("lr={lr}"),
            "--experiment",
            "names-exp",
            "--name",
            name,
            "--wait",
        ]);
        text(out).trim().to_string()
    };
    let a = submit("first", "1e-4");
    let b = submit("second", "2e-5");
    assert_eq!(a.lines().count(), 1, "-q --wait prints the id only: {a}");
    assert_eq!(cli.json(&["show", "names-exp/first"])["id"], a.as_str());
    // -q history lists ids only, one per line.
    assert_eq!(
        cli.quiet(&[
            "history",
            "--experiment",
            "names-exp",
            "--sort",
            "submitted"
        ]),
        format!("{a}\n{b}")
    );
    // Off a terminal, waiting prints plain progress lines on stderr.
    let waited = cli.raw(&["wait", "names-exp/first"]);
    let err = String::from_utf8_lossy(&waited.stderr);
    assert!(
        err.contains("sft first: succeeded, ") && err.contains("loss="),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&waited.stdout).contains(&a));
    fails(cli.raw(&["cancel", "nonsense"]), "is not a job");
    fails(
        cli.raw(&["show", "names-exp/third"]),
        "no job named \"third\"",
    );
    // A typo gets a suggestion.
    fails(
        cli.raw(&[
            "submit",
            "--kind",
            "sft",
            "--input",
            &format!("model={model}"),
            "--input",
            &format!("data={sft}"),
            "--set",
            "lrr=1e-5",
        ]),
        "did you mean `lr`",
    );
    // Another tool's name for it, and every bad value at once.
    let out = cli.raw(&[
        "submit",
        "--kind",
        "sft",
        "--input",
        &format!("model={model}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "learning_rate=1e-5",
        "--set",
        "batch_size=0",
        "--set",
        "epochs=-1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for says in [
        "unknown hyperparameter `learning_rate`: did you mean `lr`?",
        "`batch_size` = 0",
        "`epochs` = -1",
    ] {
        assert!(err.contains(says), "wanted {says:?} in {err}");
    }
    assert!(!err.contains("; ("), "no stray separator: {err}");

    // History: the hyperparameter that differs is a column, names in full,
    // start and duration shown; --columns chooses.
    let table = text(cli.raw(&["history", "--experiment", "names-exp"]));
    let header = table.lines().next().unwrap();
    for col in [
        "job",
        "name",
        "started",
        "duration",
        "hp.lr",
        "metric.loss",
        "outputs",
    ] {
        assert!(header.contains(col), "{col} missing: {table}");
    }
    assert!(
        !header.contains("hp.steps"),
        "steps is the same for both: {header}"
    );
    assert!(table.contains(&a) && table.contains(&b) && table.contains("second"));
    assert!(table.contains("1e-4") && table.contains("2e-5"), "{table}");
    let chosen = text(cli.raw(&["history", "--columns", "name,hp.lr,duration"]));
    assert_eq!(
        chosen
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["name", "hp.lr", "duration"]
    );
    fails(
        cli.raw(&["history", "--columns", "name,bogus"]),
        "no column \"bogus\"",
    );
    // Two jobs overlaid, a panel per metric, legend with their names; PNG too.
    let svg_path = dir.path().join("both.svg");
    text(cli.raw(&[
        "plot",
        "names-exp/first",
        "names-exp/second",
        "--metric",
        "loss",
        "--metric",
        "lr",
        "--out",
        svg_path.to_str().unwrap(),
    ]));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(
        svg_text(&svg, "first") && svg_text(&svg, "second"),
        "legend names the jobs"
    );
    assert!(svg_text(&svg, "step"), "the x axis is labelled");
    assert!(svg.matches("<polyline").count() >= 4, "2 jobs x 2 metrics");
    let png_path = dir.path().join("both.png");
    text(cli.raw(&[
        "plot",
        "names-exp/first",
        "names-exp/second",
        "--metric",
        "loss",
        "--out",
        png_path.to_str().unwrap(),
    ]));
    let png = std::fs::read(&png_path).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    // Without --out, nothing is written: sparklines and a hint.
    let spark = text(cli.raw(&["plot", "names-exp/first"]));
    assert!(spark.contains("--out"), "{spark}");
    // History sorted by a metric, as the README says.
    let sorted = cli.json(&[
        "history",
        "--experiment",
        "names-exp",
        "--sort",
        "-metric.loss",
    ]);
    assert_eq!(sorted.as_array().unwrap().len(), 2);

    // A closed pipe ends the client quietly (no panic message).
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "--server",
            &d.addr,
            "--data-dir",
            d.dir.to_str().unwrap(),
            "history",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );

    // Parquet as the hub serves it: UltraFeedback-binarized rows.
    let uf = f.join("../parquet/ultrafeedback.parquet");
    let imported = cli.json(&[
        "import",
        "dataset",
        uf.to_str().unwrap(),
        "--kind",
        "preference",
    ]);
    assert_eq!(imported["summary"]["rows"], 3, "{imported}");
    assert!(
        imported["summary"]["notes"][0]
            .as_str()
            .unwrap()
            .contains("prompt_id, score_chosen"),
        "{imported}"
    );
    let corpus = f.join("../parquet/corpus.parquet");
    let imported = cli.json(&[
        "import",
        "dataset",
        corpus.to_str().unwrap(),
        "--kind",
        "sft",
    ]);
    assert_eq!(imported["summary"]["text_rows"], 2, "{imported}");

    // Status for people.
    let status = text(cli.raw(&["status"]));
    assert!(
        status.contains("jobs: 0 queued, 0 running, 2 succeeded"),
        "{status}"
    );

    // Artifacts: list, look at a dataset's rows, export it.
    let list = text(cli.raw(&["artifacts", "--kind", "sft"]));
    assert!(
        list.contains(&sft[..12]) && list.contains("sft.jsonl"),
        "{list}"
    );
    assert!(!list.contains(&model[..12]), "--kind filters: {list}");
    let shown = text(cli.raw(&["show", &sft, "--rows", "2"]));
    assert!(
        shown.contains("row 1:") && shown.contains("row 2:") && shown.contains("user:"),
        "{shown}"
    );
    let out = dir.path().join("sft-out.jsonl");
    text(cli.raw(&["export", &sft, out.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&sft_file).unwrap()
    );
    fails(cli.raw(&["export", &sft, out.to_str().unwrap()]), "--force");
    text(cli.raw(&["export", &sft, out.to_str().unwrap(), "--force"]));
    // Lineage names each node once, without "checkpoint checkpoint".
    let ckpt = cli.json(&["show", &a])["outputs"]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let lineage = text(cli.raw(&["lineage", &ckpt]));
    assert!(!lineage.contains("checkpoint checkpoint"), "{lineage}");
    assert!(
        lineage.contains("output `checkpoint` of sft job \"first\""),
        "{lineage}"
    );

    // A daemon that never started: say so, and how to start one.
    let none = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "--data-dir",
            dir.path().join("nothing").to_str().unwrap(),
            "status",
        ])
        .env_remove("HERD_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("is herdd running?") && err.contains("herdd"),
        "{err}"
    );
}

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

/// The tensors of a safetensors file: name -> shape.
fn tensor_shapes(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect()
}

/// A PEFT adapter through the CLI: imported against its base, trained on
/// by sft and dpo (the reference: the base with the adapter off) from the
/// fixture's first step, exported as PEFT lays it out, merged into a plain
/// checkpoint equal to PEFT's merge; and the refusals a user meets.
#[test]
fn lora_adapter_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    // `herd -q` with a command line split at spaces.
    let q = |line: String| cli.quiet(&line.split(' ').collect::<Vec<_>>());
    let raw = |line: String| {
        let out = cli.raw(&line.split(' ').collect::<Vec<_>>());
        assert!(!out.status.success(), "{line} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let f = fixtures();
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("lora/expected.json")).unwrap())
            .unwrap();
    let fx = |name: &str| f.join(name).to_str().unwrap().to_string();
    let base = q(format!("import model {}", fx("ref")));
    let policy = q(format!("import model {}", fx("policy")));
    let adapter_dir = f.join("lora/adapter");

    // Without its base, an adapter is refused, saying how to give it.
    let err = raw(format!("import model {}", fx("lora/adapter")));
    assert!(err.contains("--base"), "{err}");

    let adapter = q(format!("import model {} --base {base}", fx("lora/adapter")));
    let shown = cli.json(&["show", &adapter]);
    assert_eq!(shown["artifact"]["artifact"], "adapter", "{shown}");
    assert_eq!(shown["artifact"]["summary"]["base"], base.as_str());
    assert_eq!(shown["artifact"]["summary"]["rank"], 4);
    let sft = q(format!("import dataset {} --kind sft", fx("sft.jsonl")));
    let prefs = q(format!(
        "import dataset {} --kind preference",
        fx("preferences.jsonl")
    ));

    // sft and dpo continue the adapter: step 1 is the fixture's (sft with
    // the fixture's optimizer step: AdamW at 1e-2, no clipping).
    let last = |job: &str, metric: &str| -> f64 {
        let j = cli.json(&["show", job]);
        assert_eq!(j["status"], "succeeded", "{j}");
        j["last_metrics"][metric][1].as_f64().unwrap()
    };
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        )
    };
    let sft_job = q(format!(
        "submit --kind sft --input model={base} --input adapter={adapter} --input data={sft} \
         --set steps=1 --set batch_size=3 --set lr=1e-2 --set grad_clip=0 --wait"
    ));
    close(
        last(&sft_job, "loss"),
        e["sft"]["loss"].as_f64().unwrap(),
        "lora sft loss",
    );
    assert_eq!(last(&sft_job, "lr"), 1e-2);
    let dpo_job = q(format!(
        "submit --kind dpo --input model={base} --input adapter={adapter} --input data={prefs} \
         --set steps=1 --set batch_size=3 --set min_strength=slightly_better --wait"
    ));
    close(
        last(&dpo_job, "loss"),
        e["dpo"]["loss"].as_f64().unwrap(),
        "lora dpo loss",
    );

    // What they made is an adapter of the same base, laid out as PEFT's.
    let j = cli.json(&["show", &sft_job]);
    assert!(j["outputs"].get("checkpoint").is_none(), "{j}");
    let trained = j["outputs"]["adapter"].as_str().unwrap().to_string();
    assert_eq!(
        cli.json(&["show", &trained])["artifact"]["summary"]["base"],
        base.as_str()
    );
    let want = tensor_shapes(&adapter_dir.join("adapter_model.safetensors"));
    for (hash, to) in [(&adapter, "imported"), (&trained, "trained")] {
        let out = dir.path().join(to);
        cli.json(&["export", hash, out.to_str().unwrap()]);
        assert_eq!(
            tensor_shapes(&out.join("adapter_model.safetensors")),
            want,
            "{to}"
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["r"], 4, "{to}");
        assert_eq!(config["lora_alpha"], 8.0, "{to}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("imported/adapter_model.safetensors")).unwrap(),
        std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap(),
        "the imported adapter comes back byte for byte"
    );
    // An adapter herd wrote names its base by hash: it imports without --base.
    let again = q(format!(
        "import model {}",
        dir.path().join("trained").to_str().unwrap()
    ));
    assert_eq!(again, trained);

    // A job reference to a LoRA job's checkpoint is refused at submit, and
    // so is an adapter given with a model it does not adapt.
    let err = raw(format!(
        "submit --kind sft --input model=job:{sft_job}/checkpoint --input data={sft}"
    ));
    assert!(
        err.contains("makes no output `checkpoint` (it makes: adapter)"),
        "{err}"
    );
    let err = raw(format!(
        "submit --kind sft --input model={policy} --input adapter={adapter} --input data={sft}"
    ));
    assert!(
        err.contains(&format!("adapter of checkpoint {base}")),
        "{err}"
    );

    // merge of the adapter after that step: a plain checkpoint with PEFT's
    // merged weights, and its base's files.
    let merge_job = q(format!(
        "submit --kind merge --input model={base} --input adapter={trained} --wait"
    ));
    let merged = cli.json(&["show", &merge_job])["outputs"]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let out = dir.path().join("merged");
    cli.json(&["export", &merged, out.to_str().unwrap()]);
    assert!(out.join("tokenizer.json").exists());
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let name = e["merged"]["tensor"].as_str().unwrap();
    let got: Vec<f32> = tensors[name].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(e["merged"]["weight"].clone())
        .unwrap()
        .concat();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
            "merged {name}: {a} vs {b}"
        );
    }
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
}

/// A daemon on another port is found from its data directory alone, and
/// `HERD_SERVER` takes `host:port` as people write it.
#[test]
fn a_daemon_on_another_port_is_found_from_its_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    assert!(
        !d.addr.ends_with(":7447"),
        "the test daemon must not be on the default port"
    );
    let herd = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
        c.args(args)
            .env_remove("HERD_TOKEN")
            .env_remove("HERD_SERVER")
            .env_remove("HERD_DATA_DIR");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let dir_s = dir.path().to_str().unwrap();
    for (how, out) in [
        (
            "HERD_DATA_DIR",
            herd(&[("HERD_DATA_DIR", dir_s)], &["status"]),
        ),
        ("--data-dir", herd(&[], &["--data-dir", dir_s, "status"])),
    ] {
        assert!(
            out.status.success(),
            "herd status with only {how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(d.addr.trim_start_matches("http://")),
            "{how}: {text}"
        );
    }
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let bare = d.addr.trim_start_matches("http://").to_string();
    let out = herd(
        &[("HERD_SERVER", bare.as_str()), ("HERD_TOKEN", token.trim())],
        &["status"],
    );
    assert!(
        out.status.success(),
        "HERD_SERVER={bare}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing listening: the error says where the address came from.
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("token"), "x".repeat(64)).unwrap();
    let out = herd(
        &[("HERD_SERVER", "127.0.0.1:1")],
        &["--data-dir", empty.path().to_str().unwrap(), "status"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("http://127.0.0.1:1") && err.contains("HERD_SERVER"),
        "{err}"
    );
}

/// Ids and hashes as listings print them (a prefix) work wherever a whole
/// one does, and an ambiguous prefix lists what it matches.
#[test]
fn short_ids_and_hashes_resolve_and_ambiguous_ones_list_their_matches() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let model = cli.quiet(&["import", "model", f.join("ref").to_str().unwrap()]);
    let data = cli.quiet(&[
        "import",
        "dataset",
        f.join("sft.jsonl").to_str().unwrap(),
        "--kind",
        "sft",
    ]);
    let submit = |lr: &str| {
        cli.quiet(&[
            "submit",
            "--kind",
            "sft",
            "--input",
            &format!("model={}", &model[..12]),
            "--input",
            &format!("data={}", &data[..10]),
            "--set",
            "steps=1",
            "--set",
            &format!("lr={lr}"),
        ])
    };
    let (a, b) = (submit("1e-4"), submit("2e-4"));
    let job = cli.json(&["show", &a[..13]]);
    assert_eq!(job["id"], a.as_str(), "{job}");
    assert_eq!(
        job["inputs"]["model"],
        model.as_str(),
        "the short hash went in whole: {job}"
    );
    let art = cli.json(&["show", &model[..12]]);
    assert_eq!(art["artifact"]["hash"], model.as_str(), "{art}");
    let lineage = cli.json(&["lineage", &data[..9]]);
    assert_eq!(lineage["hash"], data.as_str(), "{lineage}");
    cli.quiet(&["wait", &a[..13], &b[..13]]);
    // UUID v7 ids made in the same minute share their first 8 characters.
    if a[..8] == b[..8] {
        let out = cli.raw(&["show", &a[..8]]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("ambiguous")
                && err.contains(&a)
                && err.contains(&b),
            "{err}"
        );
    }
    for (bad, says) in [
        ("0123456", "8 or more characters of it"),
        ("ffffffffff", "no job or artifact id starts with ffffffffff"),
    ] {
        let out = cli.raw(&["show", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "herd show {bad}: {err}"
        );
    }
}

/// Rows of the wrong kind, a JSON array and a broken line each get an
/// error that says what to do, with every bad line counted.
#[test]
fn importing_the_wrong_shape_says_what_the_rows_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let prefs = f.join("preferences.jsonl");
    let fails = |args: &[&str], says: &[&str]| {
        let out = cli.raw(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "herd {args:?} succeeded");
        for s in says {
            assert!(err.contains(s), "herd {args:?}: wanted {s:?} in: {err}");
        }
    };
    fails(
        &[
            "import",
            "dataset",
            prefs.to_str().unwrap(),
            "--kind",
            "sft",
        ],
        &[
            "3 of 3 line(s) bad",
            "look like preference rows",
            "--kind preference",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let array = work.path().join("rows.json");
    std::fs::write(&array, "[{\"prompt\": \"a\", \"completion\": \"b\"},\n {\"prompt\": \"c\", \"completion\": \"d\"}]\n").unwrap();
    fails(
        &[
            "import",
            "dataset",
            array.to_str().unwrap(),
            "--kind",
            "sft",
        ],
        &["JSON array", "JSON Lines"],
    );
    let many = work.path().join("many.jsonl");
    let mut text = String::new();
    for i in 0..40 {
        text += &format!(
            "{{\"prompt\": \"p{i}\", \"completion\": {}}}\n",
            if i == 2 { "oops" } else { "1" }
        );
    }
    std::fs::write(&many, text).unwrap();
    fails(
        &["import", "dataset", many.to_str().unwrap(), "--kind", "sft"],
        &[
            "40 of 40 line(s) bad",
            "line 3, column 32: not valid JSON: expected value",
            "… and 35 more",
        ],
    );
    let out = cli.raw(&["artifacts", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed.as_array().map(|a| a.len()),
        Some(0),
        "nothing was recorded: {listed}"
    );
    // A model folder without weights is named as the user knows it.
    let folder = work.path().join("no-weights");
    std::fs::create_dir(&folder).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("ref").join(f), folder.join(f)).unwrap();
    }
    let out = cli.raw(&["import", "model", folder.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no-weights") && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(
        !err.contains("/tmp/") || err.contains(folder.to_str().unwrap()),
        "{err}"
    );
    assert!(
        !err.contains(&format!("{}", dir.path().join("tmp").display())),
        "the daemon's temp path leaked: {err}"
    );
    // A pair whose chosen equals its rejected imports, with a note.
    let ties = work.path().join("ties.jsonl");
    std::fs::write(
        &ties,
        "{\"prompt\": \"a\", \"chosen\": \"x\", \"rejected\": \"y\"}\n{\"prompt\": \"b\", \"chosen\": \"z\", \"rejected\": \"z\"}\n",
    )
    .unwrap();
    let out = cli.raw(&[
        "import",
        "dataset",
        ties.to_str().unwrap(),
        "--kind",
        "preference",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("1 row(s) rank a response above an identical one (line(s) 2)"),
        "{said}"
    );
}

/// History over mixed kinds shows only hyperparameters that differ where
/// present, and a mistyped key is an error that names the key meant.
#[test]
fn history_shows_what_differs_and_typos_say_what_was_meant() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    let f = fixtures();
    let model = cli.quiet(&["import", "model", f.join("ref").to_str().unwrap()]);
    let sft = cli.quiet(&[
        "import",
        "dataset",
        f.join("sft.jsonl").to_str().unwrap(),
        "--kind",
        "sft",
    ]);
    let prefs = cli.quiet(&[
        "import",
        "dataset",
        f.join("preferences.jsonl").to_str().unwrap(),
        "--kind",
        "preference",
    ]);
    let a = cli.quiet(&[
        "submit",
        "--kind",
        "sft",
        "--input",
        &format!("model={model}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "steps=1",
        "--set",
        "lr=1e-4",
    ]);
    let b = cli.quiet(&[
        "submit",
        "--kind",
        "dpo",
        "--input",
        &format!("model={model}"),
        "--input",
        &format!("data={prefs}"),
        "--set",
        "steps=1",
        "--set",
        "lr=2e-5",
    ]);
    cli.quiet(&["wait", &a, &b]);
    let out = cli.raw(&["history"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap();
    assert!(header.contains("hp.lr"), "lr differs: {header}");
    assert!(!header.contains("hp.beta"), "only dpo has beta: {header}");
    for (args, says) in [
        (
            vec!["history", "--where", "metric.los<2"],
            "did you mean `metric.loss`?",
        ),
        (
            vec!["history", "--sort", "-metric.los"],
            "did you mean `metric.loss`?",
        ),
        (
            vec!["history", "--columns", "job,hp.lrr"],
            "did you mean `hp.lr`?",
        ),
    ] {
        let out = cli.raw(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "herd {args:?}: {err}"
        );
    }
    // SFT that keeps no row says why.
    let out = cli.raw(&[
        "submit",
        "--kind",
        "sft",
        "--input",
        &format!("model={model}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "max_seq_len=2",
        "--wait",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no SFT examples left")
            && err.contains("raise max_seq_len"),
        "{err}"
    );
}
