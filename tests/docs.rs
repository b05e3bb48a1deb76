//! Docs that are tested cannot rot: the first `sh` block of README "Using
//! it" and of `examples/bring_your_own.md` run as written, in bash, against
//! a real herdd they start themselves. The only changes: `cargo` lines are
//! skipped (the test build's `herd` and `herdd` are put on the PATH instead),
//! HOME is a temporary directory, and HERD_LISTEN puts herdd on a free port,
//! not the default: `herd` finds it through the data directory alone (no
//! HERD_SERVER), as the README says. The files the blocks name are the
//! repository's fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The first ```sh block after `heading` (or the first in the file).
fn sh_block(doc: &str, heading: Option<&str>) -> String {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let from = heading.map_or(0, |h| {
        text.find(h).unwrap_or_else(|| panic!("{doc}: no {h}"))
    });
    let start = text[from..].find("```sh\n").expect("an sh block") + from + 6;
    let end = text[start..].find("```").unwrap() + start;
    text[start..end].to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_block(block: &str, cwd: &Path) -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_herd"));
    let bin_dir = bin.parent().unwrap();
    let home = cwd.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let port = free_port();
    assert_ne!(port, 7447, "a non-default port");
    let body: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo "))
        .map(|l| format!("{l}\n"))
        .collect();
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{body}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd)
        .env("HOME", &home)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("HERD_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("HERD_SERVER")
        .env_remove("HERD_TOKEN")
        .env_remove("HERD_DATA_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the block failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).unwrap();
}

#[test]
fn readme_using_it_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let f = fixtures();
    link(&f.join("policy"), &cwd.join("my-llama"));
    link(&f.join("preferences.jsonl"), &cwd.join("prefs.jsonl"));
    std::fs::write(
        cwd.join("prompts.jsonl"),
        "{\"prompt\": \"What is 2+3?\"}\n{\"prompt\": \"Name a colour.\"}\n",
    )
    .unwrap();
    link(&repo().join("examples"), &cwd.join("examples"));
    let out = run_block(&sh_block("README.md", Some("## Using it")), cwd);
    assert!(out.contains("beta"), "herd kinds dpo lists beta: {out}");
    assert!(out.contains("ok:"), "herd verify says ok: {out}");
    assert!(cwd.join("out/config.json").exists());
    assert!(cwd.join("loss.svg").exists());
}

#[test]
fn bring_your_own_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let f = fixtures();
    link(&f.join("policy"), &cwd.join("Llama-3.2-1B-Instruct"));
    link(&f.join("preferences.jsonl"), &cwd.join("prefs.jsonl"));
    link(&f.join("sft.jsonl"), &cwd.join("sft.jsonl"));
    link(&f.join("lora/adapter"), &cwd.join("my-peft-adapter"));
    // The LoRA block goes on from the first one's daemon and variables.
    let doc = "examples/bring_your_own.md";
    let blocks = sh_block(doc, None) + &sh_block(doc, Some("**LoRA and bf16.**"));
    let out = run_block(&blocks, cwd);
    assert!(
        out.contains("parameters"),
        "the import prints shapes: {out}"
    );
    assert!(
        cwd.join("my-dpo-model/model.safetensors").exists()
            || cwd.join("my-dpo-model/config.json").exists()
    );
    assert!(cwd.join("merged-model/model.safetensors").exists());
}
