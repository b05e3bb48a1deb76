//! A full disk: appends fail with a clear "no space" error, nothing of them
//! is recorded, and the log takes writes again once space returns, without
//! a restart. Runs on a small tmpfs it mounts itself (needs root, as CI
//! has); where it can't mount one it says loudly that it was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use herd_store::{EventLog, ExpectedVersion, NewEvent, StoreError};
use serde_json::json;

/// A 16 MiB tmpfs at a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    _keep: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let keep = tempfile::tempdir().ok()?;
        let dir = keep.path().join("disk");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { dir, _keep: keep })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Fill the disk with one file until the file system says no.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![7u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

fn tick(n: u64) -> Vec<NewEvent> {
    vec![NewEvent::new(
        "Tick",
        json!({"n": n, "pad": "x".repeat(2000)}),
    )]
}

#[test]
fn a_full_disk_refuses_appends_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount() else {
        eprintln!(
            "SKIPPED a_full_disk_refuses_appends_and_recovers_when_space_returns: \
             could not mount a tmpfs (needs root; CI runs as root)"
        );
        return;
    };
    let log_dir = disk.dir.join("log");
    let filler = disk.dir.join("filler");
    let log = EventLog::open(&log_dir).unwrap();
    for n in 0..10 {
        log.append("s", ExpectedVersion::Any, tick(n)).unwrap();
    }
    let acknowledged = log.head_seq();
    fill(&filler);
    // The disk is full: an append that does not fit is refused, clearly.
    let mut refused = 0;
    for n in 0..50 {
        match log.append("s", ExpectedVersion::Any, tick(100 + n)) {
            Ok(_) => {}
            Err(StoreError::NoSpace) => refused += 1,
            Err(e) => panic!("expected NoSpace, got {e}"),
        }
    }
    assert!(refused > 0, "no append hit the full disk");
    let head_when_full = log.head_seq();
    log.verify_chain().unwrap();
    // Space returns: the same log takes writes again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let r = log.append("s", ExpectedVersion::Any, tick(999)).unwrap();
    assert_eq!(r.first_seq, head_when_full + 1);
    assert_eq!(log.verify_chain().unwrap().events, head_when_full + 1);
    drop(log);
    // And everything acknowledged is there after a reopen.
    let log = EventLog::open(&log_dir).unwrap();
    assert_eq!(log.verify_chain().unwrap().events, head_when_full + 1);
    assert!(log.head_seq() >= acknowledged);
}
