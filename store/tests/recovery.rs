//! Damage to the record file, as a disk, a crash or a hand would do it: every
//! case either opens with every acknowledged event intact (only a torn,
//! never-acknowledged last line is cut) or refuses to open, naming the
//! sequence and byte offset; `repair` then sets the damaged suffix aside
//! (nothing deleted) and says how many acknowledged events that was.

use std::path::Path;

use herd_store::{repair, EventLog, ExpectedVersion, NewEvent, StoreError};
use serde_json::json;

const EVENTS: u64 = 40;

/// A log of `EVENTS` acknowledged events over three streams, closed cleanly.
fn written_log(dir: &Path) {
    let log = EventLog::open(dir).unwrap();
    for i in 0..EVENTS {
        let stream = format!("s{}", i % 3);
        log.append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("Tick", json!({ "n": 1000 + i }))],
        )
        .unwrap();
    }
}

fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("events.jsonl")
}

/// The record file's lines (without their newlines) and whatever follows the last one.
fn lines(dir: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(file(dir)).unwrap();
    let mut out: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
    assert!(out.pop().unwrap().is_empty(), "the log ends with a newline");
    out
}

fn write_lines(dir: &Path, lines: &[Vec<u8>], tail: &[u8]) {
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(tail);
    std::fs::write(file(dir), bytes).unwrap();
}

/// Byte offset where record `seq` (1-based) starts.
fn offset_of(dir: &Path, seq: u64) -> u64 {
    lines(dir)[..seq as usize - 1]
        .iter()
        .map(|l| l.len() as u64 + 1)
        .sum()
}

/// Change one digit of record `seq`'s payload, keeping its length.
fn flip_digit(dir: &Path, seq: u64) {
    let mut ls = lines(dir);
    let line = &mut ls[seq as usize - 1];
    let at = line.windows(4).position(|w| w == b"\"n\":").unwrap() + 4;
    line[at + 3] = if line[at + 3] == b'9' { b'8' } else { b'9' };
    write_lines(dir, &ls, b"");
}

/// Remove sled's files: the index is gone, the records stay.
fn delete_index(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "events.jsonl" {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
}

fn acknowledged(dir: &Path) -> u64 {
    let log = EventLog::open(dir).unwrap();
    let n = log.verify_chain().unwrap().events;
    assert_eq!(n, log.head_seq());
    n
}

/// Opening must refuse, naming `seq` and its byte offset.
fn refused_at(dir: &Path, seq: u64) -> String {
    let err = EventLog::open(dir)
        .err()
        .expect("a damaged log must not open");
    match &err {
        StoreError::Damaged { seq: s, offset, .. } => {
            assert_eq!(*s, seq, "{err}");
            assert_eq!(*offset, offset_of(dir, seq), "{err}");
        }
        other => panic!("expected Damaged at {seq}, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("herdd repair"), "{msg}");
    msg
}

/// Repair without `--accept-loss`: finds the damage, names what would be
/// lost, changes nothing (the log still refuses to open the same way).
fn repair_refuses(dir: &Path, seq: u64, lost: (u64, u64), acknowledged: u64) -> String {
    let before = std::fs::read(file(dir)).ok();
    let report = repair(dir, false).unwrap();
    assert!(!report.applied, "{report:?}");
    assert_eq!(report.damaged_at.map(|d| d.0), Some(seq), "{report:?}");
    assert_eq!(report.lost, Some(lost), "{report:?}");
    assert_eq!(report.acknowledged_lost, acknowledged, "{report:?}");
    assert_eq!(
        std::fs::read(file(dir)).ok(),
        before,
        "refusing changed the log"
    );
    let again = repair(dir, false).unwrap();
    assert_eq!(again.damaged_at, report.damaged_at, "the index was kept");
    report.finding()
}

#[test]
fn a_flipped_digit_in_the_middle_is_named_where_it_is_with_or_without_the_index() {
    for drop_index in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        written_log(dir.path());
        assert_eq!(acknowledged(dir.path()), EVENTS);
        flip_digit(dir.path(), 20);
        if drop_index {
            delete_index(dir.path());
        }
        // Record 20 still parses, but record 21 no longer names its hash:
        // nothing vouches for record 20, so it is the one named.
        let msg = refused_at(dir.path(), 20);
        assert!(msg.contains("changed after it was written"), "{msg}");
        // Refusing changed nothing.
        assert_eq!(lines(dir.path()).len() as u64, EVENTS);
        let acknowledged_lost = if drop_index { 0 } else { EVENTS - 19 };
        repair_refuses(dir.path(), 20, (20, EVENTS), acknowledged_lost);
        let report = repair(dir.path(), true).unwrap();
        assert!(report.applied);
        assert_eq!(report.damaged_at.map(|d| d.0), Some(20));
        assert_eq!(report.events_kept, 19);
        assert_eq!(report.acknowledged_set_aside, EVENTS - 19);
        let quarantined = dir
            .path()
            .join(report.quarantine_file.unwrap().trim_start_matches("log/"));
        let set_aside = std::fs::read(quarantined).unwrap();
        assert_eq!(
            set_aside.iter().filter(|&&b| b == b'\n').count() as u64,
            EVENTS - 19
        );
        assert_eq!(acknowledged(dir.path()), 19);
    }
}

#[test]
fn a_flipped_last_record_is_caught_by_the_index_head() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    flip_digit(dir.path(), EVENTS);
    let msg = refused_at(dir.path(), EVENTS);
    assert!(msg.contains("differ from what was acknowledged"), "{msg}");
    // Repair used to call this log intact: the chain links, only the
    // index knows the last record's bytes changed.
    let said = repair_refuses(dir.path(), EVENTS, (EVENTS, EVENTS), 1);
    assert!(said.contains("differ from what was acknowledged"), "{said}");
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.events_kept, EVENTS - 1);
    assert_eq!(report.acknowledged_set_aside, 1);
    assert_eq!(acknowledged(dir.path()), EVENTS - 1);
}

#[test]
fn acknowledged_records_cut_from_the_end_are_named_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let ls = lines(dir.path());
    write_lines(dir.path(), &ls[..EVENTS as usize - 3], b"");
    let err = EventLog::open(dir.path()).err().expect("must not open");
    assert!(
        matches!(err, StoreError::Damaged { seq, .. } if seq == EVENTS - 2),
        "{err}"
    );
    let want = format!("acknowledged events {}–{EVENTS} are missing", EVENTS - 2);
    assert!(err.to_string().contains(&want), "{err}");
    let said = repair_refuses(dir.path(), EVENTS - 2, (EVENTS - 2, EVENTS), 3);
    assert!(said.contains(&want), "{said}");
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.events_kept, EVENTS - 3);
    assert_eq!(
        report.quarantine_file, None,
        "nothing was there to set aside"
    );
    assert_eq!(acknowledged(dir.path()), EVENTS - 3);
}

#[test]
fn a_deleted_log_is_named_as_gone_with_its_acknowledged_events() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    std::fs::remove_file(file(dir.path())).unwrap();
    let err = EventLog::open(dir.path()).err().expect("must not open");
    assert!(matches!(err, StoreError::Damaged { seq: 1, .. }), "{err}");
    assert!(err.to_string().contains("the log is gone"), "{err}");
    assert!(!file(dir.path()).exists(), "refusing created nothing");
    let said = repair_refuses(dir.path(), 1, (1, EVENTS), EVENTS);
    assert!(
        said.contains(&format!("the index recorded {EVENTS} acknowledged events")),
        "{said}"
    );
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.events_kept, 0);
    assert_eq!(acknowledged(dir.path()), 0);
}

#[test]
fn a_torn_acknowledged_record_is_a_loss_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let ls = lines(dir.path());
    let last = &ls[EVENTS as usize - 1];
    let half = &last[..last.len() / 2];
    write_lines(dir.path(), &ls[..EVENTS as usize - 1], half);
    // The index recorded it: it was acknowledged, so opening must not cut it.
    let err = EventLog::open(dir.path()).err().expect("must not open");
    assert!(
        matches!(err, StoreError::Damaged { seq, .. } if seq == EVENTS),
        "{err}"
    );
    assert!(err.to_string().contains("cut"), "{err}");
    repair_refuses(dir.path(), EVENTS, (EVENTS, EVENTS), 1);
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.torn_bytes_set_aside, half.len() as u64);
    assert_eq!(report.events_kept, EVENTS - 1);
    assert_eq!(acknowledged(dir.path()), EVENTS - 1);
}

#[test]
fn a_torn_last_line_is_cut_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let ls = lines(dir.path());
    // Half of a record that never got its newline: a write cut short.
    let half = &ls[5][..ls[5].len() / 2];
    write_lines(dir.path(), &ls, half);
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.recovery().torn_bytes_cut, half.len() as u64);
    assert_eq!(log.verify_chain().unwrap().events, EVENTS);
    drop(log);
    // Zeros (a block the file system allocated but never wrote) are torn too.
    write_lines(dir.path(), &ls, &[0u8; 4096]);
    assert_eq!(acknowledged(dir.path()), EVENTS);
}

#[test]
fn a_whole_garbage_line_after_the_last_record_stops_the_open() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let ls = lines(dir.path());
    write_lines(dir.path(), &ls, b"not a record\n");
    refused_at(dir.path(), EVENTS + 1);
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.acknowledged_set_aside, 1);
    assert_eq!(report.events_kept, EVENTS);
    assert_eq!(acknowledged(dir.path()), EVENTS);
}

#[test]
fn a_duplicated_line_stops_the_open() {
    for drop_index in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        written_log(dir.path());
        let mut ls = lines(dir.path());
        ls.insert(10, ls[9].clone()); // record 10 twice
        write_lines(dir.path(), &ls, b"");
        if drop_index {
            delete_index(dir.path());
        }
        let err = EventLog::open(dir.path()).err().expect("must not open");
        assert!(matches!(err, StoreError::Damaged { seq: 11, .. }), "{err}");
        let report = repair(dir.path(), true).unwrap();
        assert_eq!(report.events_kept, 10);
        assert_eq!(report.acknowledged_set_aside, EVENTS + 1 - 10);
    }
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_records() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    delete_index(dir.path());
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.recovery().reindexed, EVENTS);
    assert_eq!(log.verify_chain().unwrap().events, EVENTS);
    // Stream versions came back too.
    let r = log
        .append(
            "s0",
            ExpectedVersion::Exact(EVENTS.div_ceil(3)),
            vec![NewEvent::new("T", json!(1))],
        )
        .unwrap();
    assert_eq!(r.first_seq, EVENTS + 1);
}

#[test]
fn repair_on_an_intact_log_keeps_everything_and_rebuilds_the_index() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let report = repair(dir.path(), true).unwrap();
    assert_eq!(report.damaged_at, None);
    assert_eq!(report.acknowledged_set_aside, 0);
    assert_eq!(report.events_kept, EVENTS);
    assert!(report.old_index.is_some());
    assert_eq!(acknowledged(dir.path()), EVENTS);
}
