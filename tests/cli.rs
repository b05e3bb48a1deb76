//! The `herd` CLI against a real daemon: every command, `--json` parsed.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

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
        "--name",
        "sft-low",
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
        id2,
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
    // One legend above the panels (each job named once), and each job in
    // one colour in every panel.
    assert_eq!(
        svg.matches(">sft-low<").count() + svg.matches(">\nsft-low\n<").count(),
        1,
        "{svg}"
    );
    let strokes: Vec<&str> = svg
        .split("<polyline")
        .skip(1)
        .filter_map(|p| p.split("stroke=\"").nth(1)?.split('"').next())
        .filter(|c| *c != "#000000")
        .collect();
    assert_eq!(strokes.len(), 6, "legend, loss, grad_norm: {strokes:?}");
    assert_ne!(strokes[0], strokes[1]);
    assert_eq!(strokes[0..2], strokes[2..4]);
    assert_eq!(strokes[0..2], strokes[4..6]);
    // Diff of two jobs: lr differs, inputs the same.
    let diff = cli.json(&["diff", id1, id2]);
    let rows = diff[0]["rows"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["key"] == "lr" && r["same"] == false));
    assert!(rows
        .iter()
        .any(|r| r["key"] == "model" && r["same"] == true));
    // As text: both jobs named in the header, only what differs (lr, the
    // outputs, the metrics), the identical rows counted.
    let text = cli.text(&["diff", id1, id2]);
    let header = text.lines().next().unwrap();
    assert!(
        header.contains("sft (") && header.contains("sft-low ("),
        "{text}"
    );
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(" ")).collect();
    assert!(rows.iter().any(|l| l.contains(" lr ")), "{text}");
    assert!(!rows.iter().any(|l| l.contains(" batch_size ")), "{text}");
    assert!(
        text.contains("identical rows not shown; --all shows them"),
        "{text}"
    );
    assert!(cli
        .text(&["diff", id1, id2, "--all"])
        .contains(" batch_size "));
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
    // Export round-trips as recorded: import gives the same tree hash.
    let out = dir.path().join("exported");
    cli.json(&["export", &ckpt, out.to_str().unwrap(), "--as-recorded"]);
    assert_eq!(
        cli.json(&["import", "model", out.to_str().unwrap()])["hash"],
        ckpt.as_str()
    );
    // By default an export carries a model card: Hugging Face front matter
    // (each value JSON, so YAML too) whose lineage is `herd lineage`'s.
    let carded = dir.path().join("carded");
    cli.json(&["export", &ckpt, carded.to_str().unwrap()]);
    let card = std::fs::read_to_string(carded.join("README.md")).unwrap();
    let front = card
        .strip_prefix("---\n")
        .and_then(|c| c.split_once("\n---\n"))
        .map(|(f, _)| f)
        .unwrap_or_else(|| panic!("front matter: {card}"));
    let field = |k: &str| -> Value {
        let line = front
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("{k} in {front}"));
        serde_json::from_str(line).unwrap()
    };
    assert_eq!(field("library_name"), "transformers");
    assert_eq!(field("tags"), json!(["herd", "sft"]));
    assert_eq!(field("base_model"), "ref", "the base's import name");
    assert_eq!(field("datasets"), json!(["sft.jsonl"]));
    fn hashes(n: &Value, out: &mut Vec<String>) {
        let h = n["hash"].as_str().unwrap().to_string();
        if !out.contains(&h) {
            out.push(h);
        }
        if let Some(inputs) = n["job"]["inputs"].as_object() {
            inputs.values().for_each(|i| hashes(i, out));
        }
    }
    let mut want = vec![];
    hashes(&cli.json(&["lineage", &ckpt]), &mut want);
    assert_eq!(field("herd")["lineage"], json!(want));
    assert_eq!(field("herd")["artifact"], ckpt.as_str());
    assert!(card.contains(&format!("herd reproduce {id1}")), "{card}");
    assert!(card.contains("## Hyperparameters (effective)"), "{card}");
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
    // Job outputs are named by their maker, as `herd show` addresses it,
    // and the maker's id is a prefix that tells the two jobs apart.
    let made = text(cli.raw(&["artifacts", "--kind", "checkpoint"]));
    for (name, id) in [("first", &a), ("second", &b)] {
        let row = made
            .lines()
            .find(|l| l.contains(&format!("names-exp/{name}.checkpoint")))
            .unwrap_or_else(|| panic!("{name}: {made}"));
        let by = row.split_whitespace().nth(4).unwrap();
        assert!(
            row.contains(" sft ") && id.starts_with(by) && by.len() >= 8,
            "{row}"
        );
        assert_eq!(
            cli.json(&["show", by])["id"],
            id.as_str(),
            "the prefix resolves"
        );
    }
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

/// Terminal output as the lines it draws: each ANSI escape sequence (CSI
/// `ESC [ ... letter`: cursor moves, line clears) becomes a line break.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            out.push('\n');
            continue;
        }
        out.push(c);
    }
    out
}

/// `herd watch` on a real 80-column terminal (a pty made by `script`): no
/// line wraps, a queued job is not "0/1", a job that succeeded ends full,
/// and watching when nothing runs says so.
#[test]
fn watch_on_an_80_column_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        system::skip(
            "watch_on_an_80_column_terminal",
            "no `script` (util-linux) to give herd a terminal",
            "HERD_REQUIRE_SCRIPT",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--cpu-jobs", "1"]);
    let c = d.client();
    let cli = Cli { d: &d };
    let (r, _, _, _, sft) = import_fixtures(&c);
    let submit = |name: &str| {
        cli.quiet(&[
            "submit",
            "--kind",
            "sft",
            "--name",
            name,
            "--input",
            &format!("model={r}"),
            "--input",
            &format!("data={sft}"),
            "--set",
            "steps=300",
            "--set",
            "batch_size=2",
        ])
    };
    // Long names, so a line that did not fit would wrap; one slot, so the
    // second waits in the queue while the first runs.
    let first = submit("a-job-name-much-longer-than-twenty-columns");
    submit("another-long-name-that-queues-behind-it");
    let out = d
        .herd_on_a_terminal(80, 24, "watch")
        .expect("script was found above");
    let screen = strip_ansi(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{screen}");
    let lines: Vec<&str> = screen.split(['\n', '\r']).collect();
    std::fs::create_dir_all(shots()).unwrap();
    std::fs::write(shots().join("watch-80.txt"), &screen).unwrap();
    for l in &lines {
        assert!(l.chars().count() <= 80, "wider than 80 columns: {l:?}");
    }
    assert!(!screen.contains(" 0/1 "), "{screen}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("queued") && l.starts_with("sft another-long")),
        "the queued job is shown: {screen}"
    );
    let finals: Vec<&&str> = lines.iter().filter(|l| l.contains("succeeded")).collect();
    assert!(
        finals.iter().any(|l| l.contains("300/300")),
        "a succeeded bar ends full: {screen}"
    );
    assert_eq!(
        c.job(&first).unwrap().status,
        herd_client::JobStatus::Succeeded
    );
    // Nothing left to watch: say so rather than exit silently.
    let idle = cli.raw(&["watch"]);
    assert!(idle.status.success());
    assert!(
        String::from_utf8_lossy(&idle.stderr).contains("nothing is queued or running"),
        "{}",
        String::from_utf8_lossy(&idle.stderr)
    );
}

/// Where tests leave pictures and captures of screens for the README.
fn shots() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/cli-screens")
}
