//! Finding things as people type them: a daemon on another port, short
//! ids and hashes, history keys with a typo, what each command is for.

mod common;

use std::process::Command;

use common::*;

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
    // On a terminal one column narrower than that table, hyperparameter
    // columns give way and a footer names them.
    let widest = table.lines().map(|l| l.chars().count()).max().unwrap();
    match d.herd_on_a_terminal(widest - 1, 50, "history") {
        None => system::skip(
            "history_shows_what_differs_and_typos_say_what_was_meant (terminal width)",
            "no `script` (util-linux) to give herd a terminal",
            "HERD_REQUIRE_SCRIPT",
        ),
        Some(out) => {
            let screen = String::from_utf8_lossy(&out.stdout).replace('\r', "");
            assert!(out.status.success(), "{screen}");
            let lines: Vec<&str> = screen.trim_end().lines().collect();
            let (footer, rows) = lines.split_last().unwrap();
            assert!(
                footer.contains("differ:") && footer.contains("show them with --columns"),
                "{screen}"
            );
            for l in rows {
                assert!(l.chars().count() < widest, "wider than the terminal: {l:?}");
            }
            assert_eq!(rows.len(), 3, "header and two jobs: {screen}");
        }
    }
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

/// `herd -h` says what every command is for, and `herd submit -h` what
/// every option is for (`experiment`, `round`, `--seed`, `--name` and
/// `--priority` once said nothing).
#[test]
fn every_command_and_submit_option_says_what_it_is_for() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "herd {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Each entry of a clap section is "  NAME  what it is for".
    let entries = |text: &str, section: &str| -> Vec<(String, String)> {
        text.lines()
            .skip_while(|l| !l.starts_with(section))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter(|l| !l.trim_start().starts_with("-h,"))
            .map(|l| {
                let l = l.trim_start();
                let (name, what) = l.split_once("  ").unwrap_or((l, ""));
                (name.to_string(), what.trim().to_string())
            })
            .collect()
    };
    let top = help(&["-h"]);
    let commands = entries(&top, "Commands:");
    for name in [
        "submit",
        "experiment",
        "round",
        "history",
        "watch",
        "export",
    ] {
        assert!(commands.iter().any(|(n, _)| n == name), "{name}: {top}");
    }
    for (name, what) in &commands {
        assert!(!what.is_empty(), "`herd {name}` says nothing in:\n{top}");
    }
    let submit = help(&["submit", "-h"]);
    let options = entries(&submit, "Options:");
    for flag in ["--seed", "--name", "--priority", "--experiment", "--set"] {
        let what = options
            .iter()
            .find(|(n, _)| n.split([' ', ',']).any(|w| w == flag))
            .map(|(_, w)| w.as_str());
        assert!(
            what.is_some_and(|w| !w.is_empty()),
            "`herd submit {flag}` says nothing in:\n{submit}"
        );
    }
}
