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
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args([
                "--server",
                &self.d.addr,
                "--data-dir",
                self.d.dir.to_str().unwrap(),
            ])
            .args(args)
            .env_remove("HERD_TOKEN")
            .env_remove("HERD_SERVER")
            .output()
            .unwrap()
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
    assert_eq!(plot["series"].as_array().unwrap().len(), 2);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("class=\"series\"").count(), 2);
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
