//! The record survives damage: bytes are verified where they are used, a
//! full disk answers 507 and the daemon recovers, and `herdd repair` names
//! every acknowledged loss and records it, never guessing (RELIABILITY.md).
//! Split from `trust.rs`, which keeps hostile input and auth.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use herd_client::{Client, ClientError};
use serde_json::json;

fn blob_path(data: &Path, hash: &str) -> std::path::PathBuf {
    data.join("blobs")
        .join("sha256")
        .join(&hash[..2])
        .join(&hash[2..])
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o600);
    std::fs::set_permissions(path, perms).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x55;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn bytes_are_verified_where_they_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let d = Daemon::start(data);
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    let run = |c: &Client| -> String { run_short_sft(c, &r, &sft).outputs["checkpoint"].clone() };
    let first = run(&c);
    assert!(c.verify().unwrap().ok);
    // A flipped byte in the materialized checkpoint the worker reads:
    // verify reports it, and the next job trains on the recorded bytes.
    let cached = data
        .join("cache")
        .join("trees")
        .join(&r)
        .join("model.safetensors");
    flip_byte(&cached, 4000);
    let v = c.verify().unwrap();
    assert!(!v.ok);
    assert!(v.error.contains("cached checkpoint"), "{v:?}");
    assert_eq!(
        run(&c),
        first,
        "same inputs and seed, same output despite the cache flip"
    );
    // A corrupt blob is never served as a success, and the client keeps no bad file.
    let ckpt_tree = c.tree(&first).unwrap();
    let weights = ckpt_tree
        .files
        .iter()
        .find(|f| f.name == "model.safetensors")
        .unwrap()
        .blob
        .clone();
    flip_byte(&blob_path(data, &weights), 100);
    let mut sink = Vec::new();
    assert!(c.download(&weights, &mut sink).is_err());
    let out = dir.path().join("export");
    assert!(c.export(&first, &out).is_err());
    assert!(
        !out.join("model.safetensors").exists(),
        "export left a corrupt file behind"
    );
    // Nothing at all: no half-written directory, no staging directory.
    assert!(
        !out.exists(),
        "a failed export left {} behind",
        out.display()
    );
    let strays: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    let v = c.verify().unwrap();
    assert!(!v.ok);
    // Error messages name no server path.
    assert!(!v.error.contains(data.to_str().unwrap()), "{v:?}");
    // Re-uploading the right bytes repairs a corrupt blob.
    // The dataset blob: corrupt it, re-import the file, and it is whole again.
    flip_byte(&blob_path(data, &sft), 10);
    assert!(!c.verify().unwrap().ok);
    let again = c
        .import_dataset(&fixtures().join("sft.jsonl"), "sft", "sft")
        .unwrap();
    assert_eq!(again.hash, sft);
    let mut bytes = Vec::new();
    c.download(&sft, &mut bytes).unwrap();
    assert_eq!(bytes, std::fs::read(fixtures().join("sft.jsonl")).unwrap());
    // A deleted blob that the record references: verify names it.
    std::fs::remove_file(blob_path(data, &weights)).unwrap();
    let v = c.verify().unwrap();
    assert!(!v.ok);
    assert!(v.error.contains("is missing"), "{v:?}");
}

struct SmallDisk {
    dir: std::path::PathBuf,
    _keep: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let keep = tempfile::tempdir().ok()?;
        let dir = keep.path().join("disk");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir, _keep: keep })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_full_disk_answers_507_and_the_daemon_recovers_without_a_restart() {
    let Some(disk) = SmallDisk::mount("64m") else {
        eprintln!(
            "SKIPPED a_full_disk_answers_507_and_the_daemon_recovers_without_a_restart: \
             could not mount a tmpfs (needs root; CI runs as root)"
        );
        return;
    };
    let data = disk.dir.join("data");
    let mut d = Daemon::start(&data);
    let c = d.client();
    c.create_experiment("before", "").unwrap();
    let filler = disk.dir.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        for size in [1 << 16, 4096, 64, 1] {
            let block = vec![7u8; size];
            while f.write_all(&block).is_ok() {}
        }
    }
    let mut full = 0;
    for i in 0..20 {
        match c.create_experiment(&format!("full-{i}"), &"x".repeat(150)) {
            Ok(_) => {}
            Err(ClientError::Api {
                status: 507,
                message,
            }) => {
                assert!(message.contains("no space left"), "{message}");
                full += 1;
            }
            Err(e) => panic!("expected 507, got {e}"),
        }
    }
    assert!(full > 0, "no request hit the full disk");
    match c.upload_file(&fixtures().join("ref").join("model.safetensors")) {
        Err(ClientError::Api { status: 507, .. }) => {}
        other => panic!("expected a 507 upload, got {other:?}"),
    }
    std::fs::remove_file(&filler).unwrap();
    // Space is back: the same daemon records again.
    c.create_experiment("after", "").unwrap();
    assert!(c.verify().unwrap().ok);
    let names: Vec<String> = c
        .experiments()
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"after".to_string()));
    d.terminate();
}

/// `herdd repair [--accept-loss]` as a user runs it: exit code, and what it
/// said (stdout and stderr).
fn herdd_repair(data: &Path, accept_loss: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herdd"));
    cmd.args(["--data-dir", data.to_str().unwrap(), "repair"]);
    if accept_loss {
        cmd.arg("--accept-loss");
    }
    let out = cmd.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}

fn log_file(data: &Path) -> std::path::PathBuf {
    data.join("log").join("events.jsonl")
}

fn log_lines(data: &Path) -> Vec<String> {
    std::fs::read_to_string(log_file(data))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// Change one digit of record `seq`'s timestamp, keeping its length.
fn edit_record(data: &Path, seq: usize) {
    let mut lines = log_lines(data);
    let line = &mut lines[seq - 1];
    let at = line.find("\"timestamp_ms\":").unwrap() + 20;
    let digit = line.as_bytes()[at];
    line.replace_range(at..at + 1, if digit == b'9' { "8" } else { "9" });
    std::fs::write(log_file(data), lines.join("\n") + "\n").unwrap();
}

/// Each way history can be damaged after it was acknowledged: herdd refuses
/// to start and names the first damaged sequence; `herdd repair` names the
/// same sequence and what is lost, and changes nothing until the loss is
/// accepted; then the loss is in the record, and `status`, `verify` and
/// `history` say so. Repair used to call each of these directories intact
/// (or cut the innocent record after an edited one) and verify said ok.
#[test]
fn repair_names_every_acknowledged_loss_and_records_it() {
    struct Case {
        what: &'static str,
        damage: fn(&Path, usize),
        /// First damaged sequence, given the number of records.
        first: fn(usize) -> usize,
        says: fn(usize) -> String,
    }
    let cases = [
        Case {
            what: "the last record changed",
            damage: |d, n| edit_record(d, n),
            first: |n| n,
            says: |_| "differ from what was acknowledged".into(),
        },
        Case {
            what: "three acknowledged records cut from the end",
            damage: |d, n| {
                let lines = log_lines(d);
                std::fs::write(log_file(d), lines[..n - 3].join("\n") + "\n").unwrap();
            },
            first: |n| n - 2,
            says: |n| format!("acknowledged events {}–{n} are missing", n - 2),
        },
        Case {
            what: "the log deleted",
            damage: |d, _| std::fs::remove_file(log_file(d)).unwrap(),
            first: |_| 1,
            says: |n| format!("the index recorded {n} acknowledged events"),
        },
        Case {
            what: "the acknowledged last record torn",
            damage: |d, n| {
                let lines = log_lines(d);
                let last = &lines[n - 1];
                let kept = lines[..n - 1].join("\n") + "\n" + &last[..last.len() / 2];
                std::fs::write(log_file(d), kept).unwrap();
            },
            first: |n| n,
            says: |n| format!("acknowledged event {n} is missing"),
        },
        Case {
            what: "a record in the middle edited",
            damage: |d, n| edit_record(d, n / 2),
            first: |n| n / 2,
            says: |_| "changed after it was written".into(),
        },
    ];
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        {
            let d = Daemon::start(data);
            let c = d.client();
            for i in 0..30 {
                c.create_experiment(&format!("e{i}"), "").unwrap();
            }
        }
        let n = log_lines(data).len();
        (case.damage)(data, n);
        let first = (case.first)(n);
        let says = (case.says)(n);
        let what = case.what;
        let (code, err) = herdd_refuses(data, &[]);
        assert_ne!(code, 0, "{what}");
        assert!(
            err.contains(&format!("damaged at sequence {first} ")) && err.contains(&says),
            "{what}: start must name sequence {first} and say {says:?}: {err}"
        );
        // Without --accept-loss: the same sequence, the loss named, nothing changed.
        let before = std::fs::read(log_file(data)).ok();
        let (code, said) = herdd_repair(data, false);
        assert_eq!(code, 1, "{what}: {said}");
        assert!(
            said.contains(&format!("damaged at sequence {first} ")) && said.contains(&says),
            "{what}: repair must name sequence {first}: {said}"
        );
        let lost = if first == n {
            format!("lost: event {n} ")
        } else {
            format!("lost: events {first}–{n} ")
        };
        assert!(
            said.contains(&lost) && said.contains("--accept-loss"),
            "{what}: {said}"
        );
        assert_eq!(
            std::fs::read(log_file(data)).ok(),
            before,
            "{what}: refusing changed the log"
        );
        // With it: set aside, recorded.
        let (code, said) = herdd_repair(data, true);
        assert_eq!(code, 0, "{what}: {said}");
        assert!(
            said.contains("recorded the loss as event"),
            "{what}: {said}"
        );
        let d = Daemon::start(data);
        let c = d.client();
        let status = c.status().unwrap();
        assert_eq!(
            status["head_seq"].as_u64().unwrap(),
            first as u64,
            "{what}: {status}"
        );
        let repairs = status["repairs"].as_array().unwrap();
        assert_eq!(repairs.len(), 1, "{what}: {status}");
        assert_eq!(repairs[0]["first_lost"], json!(first), "{what}");
        assert_eq!(repairs[0]["last_lost"], json!(n), "{what}");
        assert_eq!(
            repairs[0]["acknowledged_lost"],
            json!(n + 1 - first),
            "{what}"
        );
        let v = c.verify().unwrap();
        assert!(v.ok, "{what}: the kept record is intact: {:?}", v.problems);
        assert_eq!(v.report["repairs"][0]["first_lost"], json!(first), "{what}");
        for args in [&["verify"][..], &["history"], &["status"]] {
            let out = d.herd(args);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!("NOTE: history was repaired at event {first}: ")),
                "{what}: `herd {args:?}` must say history was repaired: {text}"
            );
        }
    }
}

/// `herdd repair` that dies after the store set the damage aside but
/// before the loss was recorded: the store left a pending report first,
/// and the next start records it. A crash can delay the record of a loss,
/// never drop it.
#[test]
fn a_loss_whose_repair_died_before_recording_it_is_recorded_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    {
        let d = Daemon::start(data);
        for i in 0..10 {
            d.client().create_experiment(&format!("e{i}"), "").unwrap();
        }
    }
    let lines = log_lines(data);
    let n = lines.len();
    std::fs::write(log_file(data), lines[..n - 3].join("\n") + "\n").unwrap();
    // The store's half of `herdd repair` only, as if the process died then.
    let report = herd_store::repair(&data.join("log"), true).unwrap();
    assert!(report.applied && report.lost == Some((n as u64 - 2, n as u64)));
    let quarantine = data.join("log").join("quarantine");
    let pending = |suffix: &str| {
        std::fs::read_dir(&quarantine)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(suffix)
            })
            .count()
    };
    assert_eq!(pending(".pending.json"), 1);
    let d = Daemon::start(data);
    let status = d.client().status().unwrap();
    assert_eq!(status["repairs"][0]["first_lost"], json!(n - 2), "{status}");
    assert_eq!(pending(".pending.json"), 0);
    assert_eq!(pending(".recorded.json"), 1);
}

/// A job whose ending a repair lost is marked interrupted: ended, visible,
/// resubmittable, never run again on its own (it used to re-run silently).
#[test]
fn a_job_whose_ending_a_repair_lost_is_interrupted_not_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let job = {
        let d = Daemon::start(data);
        let c = d.client();
        let (_, p, _, _, sft) = import_fixtures(&c);
        run_short_sft(&c, &p, &sft).id.to_string()
    };
    // Cut the log right after the job's submission: its start, metrics,
    // outputs and success are gone.
    let lines = log_lines(data);
    let submitted = lines
        .iter()
        .position(|l| l.contains("\"JobSubmitted\"") && l.contains(&job))
        .unwrap();
    std::fs::write(log_file(data), lines[..=submitted].join("\n") + "\n").unwrap();
    let (code, said) = herdd_repair(data, true);
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("1 job(s) whose later events may be lost are marked interrupted"),
        "{said}"
    );
    let d = Daemon::start(data);
    let c = d.client();
    let j = c.job(&job).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Interrupted, "{j:?}");
    assert!(
        j.error.as_deref().unwrap_or("").contains("herd reproduce"),
        "{j:?}"
    );
    // It stays that way: nothing starts it again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.job(&job).unwrap().status,
        herd_client::JobStatus::Interrupted
    );
    let status = c.status().unwrap();
    assert_eq!(status["jobs"]["running"], json!(0), "{status}");
    assert_eq!(status["jobs"]["interrupted"], json!(1), "{status}");
    assert!(!std::fs::read_to_string(log_file(data))
        .unwrap()
        .lines()
        .skip(submitted + 1)
        .any(|l| l.contains("\"JobStarted\"")));
}
