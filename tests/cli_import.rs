//! Imports that go wrong say what the rows are and what to do.

mod common;

use common::*;
use serde_json::Value;

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
