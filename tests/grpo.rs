//! `grpo` through the daemon and the CLI: a verifier program recorded by
//! content and run by the job, rollouts shown, a job reproduced exactly, a
//! verifier whose bytes changed after import refused.

mod common;

use std::process::Output;

use common::*;
use serde_json::Value;

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_verifier_program_rewards_a_grpo_job_that_reproduces() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let f = fixtures();
    let work = tempfile::tempdir().unwrap();
    let prompts = work.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        (0..4)
            .map(|i| format!("{{\"prompt\": \"Count to {i}.\", \"answer\": \"{i}\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    // Rewards a completion by its length parity: deterministic, and
    // reads every line before it answers.
    let script = work.path().join("score.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nwhile read -r line; do n=${#line}; echo \"{\\\"reward\\\": $((n % 2))}\"; done\n",
    )
    .unwrap();
    let model = ok(
        d.herd(&["-q", "import", "model", f.join("ref").to_str().unwrap()]),
        "import model",
    );
    let data = ok(
        d.herd(&[
            "-q",
            "import",
            "dataset",
            prompts.to_str().unwrap(),
            "--kind",
            "prompts",
        ]),
        "import prompts",
    );
    let verifier = ok(
        d.herd(&["-q", "import", "verifier", script.to_str().unwrap()]),
        "import verifier",
    );
    let shown: Value =
        serde_json::from_str(&ok(d.herd(&["show", &verifier, "--json"]), "show verifier")).unwrap();
    assert_eq!(shown["artifact"]["artifact"], "verifier");
    assert_eq!(shown["artifact"]["summary"]["interpreter"], "/bin/sh");
    let submit = |verifier: &str| {
        d.herd(&[
            "-q",
            "submit",
            "--kind",
            "grpo",
            "--input",
            &format!("policy={model}"),
            "--input",
            &format!("prompts={data}"),
            "--input",
            &format!("verifier={verifier}"),
            "--set",
            "steps=2",
            "--set",
            "prompts_per_step=2",
            "--set",
            "group_size=3",
            "--set",
            "max_new_tokens=4",
            "--set",
            "lr=1e-3",
            "--wait",
        ])
    };
    let job = ok(submit(&verifier), "grpo with a verifier program");
    let rows: Value = serde_json::from_str(&ok(
        d.herd(&[
            "show", &job, "--output", "rollouts", "--rows", "5", "--json",
        ]),
        "the job's rollouts",
    ))
    .unwrap();
    let rows = rows["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        let reward = r["rewards"]["verifier"].as_f64().unwrap();
        assert!(reward == 0.0 || reward == 1.0, "{r}");
    }
    // Reproduced: the same checkpoint and rollouts, bit for bit.
    let rep: Value =
        serde_json::from_str(&ok(d.herd(&["reproduce", &job, "--json"]), "reproduce")).unwrap();
    assert_eq!(rep["identical"], true, "{rep}");
    // The recorded program's bytes changed on disk: refused, not run.
    let blob = dir
        .path()
        .join("blobs/sha256")
        .join(&verifier[..2])
        .join(&verifier[2..]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, "#!/bin/sh\necho '{\"reward\": 1}'\n").unwrap();
    let out = submit(&verifier);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a changed verifier ran");
    assert!(
        err.contains(&verifier[..12]) || err.contains("hash"),
        "{err}"
    );
}
