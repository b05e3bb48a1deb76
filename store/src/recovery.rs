//! Opening a log after a crash, and repairing one that is damaged.
//!
//! This is where the rule that keeps the record honest lives. A group's
//! records are acknowledged only after they were written whole and synced,
//! so every complete line in the file may have been acknowledged. The one
//! thing opening may cut on its own is an unterminated last line: a group
//! whose write never finished, hence never acknowledged. Any other break (a
//! record that doesn't decode, a hash that doesn't link, a sequence gap or
//! repeat, a stream version out of order) stops the open and names the
//! sequence and byte offset, like SQLite's "database disk image is
//! malformed": guessing where history ends would make the record lie.
//!
//! [`repair`] is the explicit way out. It moves the first damaged record and
//! everything after it into a quarantine file (nothing is deleted), moves
//! the old index aside, re-indexes what is intact, and reports how many
//! acknowledged events it set aside.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Backend, GroupIndex, Head, Run, LOG_FILE, SLED_FILES};
use crate::error::{Result, StoreError};
use crate::event::sha256_hex;
use crate::log::decode;

/// What opening the log did on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// Whole records found past the index's persisted head (a crash before
    /// the index caught up) and indexed again.
    pub reindexed: u64,
    /// Bytes of an unterminated last line that were cut: a group whose write
    /// never finished, so none of it was acknowledged.
    pub torn_bytes_cut: u64,
}

/// Check what the index covers, index the whole records past it, cut a torn
/// last line. Returns the committed head.
pub(crate) fn recover(backend: &Backend) -> Result<(Head, RecoveryReport)> {
    let head = backend.head()?;
    // First: a file shorter than what was indexed lost acknowledged records.
    let tail = backend.tail(head.log_end, head.seq)?;
    check_indexed(backend, &head)?;
    let mut report = RecoveryReport::default();
    if tail.is_empty() {
        return Ok((head, report));
    }
    let mut chain = Chain {
        seq: head.seq,
        hash: head.hash.clone(),
        versions: HashMap::new(),
    };
    let mut index = GroupIndex {
        first_seq: head.seq + 1,
        ..GroupIndex::default()
    };
    let mut at = 0usize;
    while let Some(len) = tail[at..].iter().position(|&b| b == b'\n') {
        let line = &tail[at..at + len];
        let offset = head.log_end + at as u64;
        let (stream, version, id) = chain.admit(line, offset, |s| backend.stream_version(s))?;
        let seq = chain.seq;
        at += len + 1;
        index.lengths.push(len as u32);
        index.ids.push((id, seq));
        match index.runs.last_mut() {
            Some((s, run)) if *s == stream && run.first_version + run.count == version => {
                run.count += 1
            }
            _ => index.runs.push((
                stream.clone(),
                Run {
                    first_version: version,
                    first_seq: seq,
                    count: 1,
                },
            )),
        }
        index.stream_versions.insert(stream, version);
    }
    let mut recovered = head.clone();
    if chain.seq > head.seq {
        report.reindexed = chain.seq - head.seq;
        index.head_hash = chain.hash.clone();
        let log_end = backend.index(index, head.log_end)?;
        backend.flush_index()?;
        recovered = Head {
            seq: chain.seq,
            hash: chain.hash,
            log_end,
        };
    }
    if at < tail.len() {
        report.torn_bytes_cut = (tail.len() - at) as u64;
        backend.truncate(recovered.log_end)?;
    }
    Ok((recovered, report))
}

/// The indexed records still form the chain the index recorded: each names
/// the hash of the one before, and the last hashes to the index's head.
/// The hashes cover every byte, so this proves the records are the bytes
/// that were written, without parsing them.
fn check_indexed(backend: &Backend, head: &Head) -> Result<()> {
    if head.seq == 0 {
        return Ok(());
    }
    let mut prev = String::new();
    let mut last_offset = 0;
    backend.for_each_record(1, head.seq, |seq, offset, bytes| {
        if prev_hash_field(bytes) != Some(prev.as_bytes()) {
            return Err(StoreError::Damaged {
                seq,
                offset,
                reason: if seq == 1 {
                    "the first record does not start the hash chain".into()
                } else {
                    format!(
                        "the record does not name the hash of record {} before it",
                        seq - 1
                    )
                },
            });
        }
        prev = sha256_hex(bytes);
        last_offset = offset;
        Ok(true)
    })?;
    if prev != head.hash {
        return Err(StoreError::Damaged {
            seq: head.seq,
            offset: last_offset,
            reason: format!(
                "the last indexed record hashes to {prev}, but {} was recorded for it: it changed after it was written",
                head.hash
            ),
        });
    }
    Ok(())
}

/// The `prev_hash` of a stored record without parsing it: the writer puts it
/// last (`…,"prev_hash":"HEX"}`).
fn prev_hash_field(record: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b",\"prev_hash\":\"";
    let body = record.strip_suffix(b"\"}")?;
    if body.ends_with(KEY) {
        return Some(b""); // the first record
    }
    let hex_start = body.len().checked_sub(64)?;
    body[..hex_start].ends_with(KEY).then(|| &body[hex_start..])
}

/// Where a walk along the chain stands: the last admitted record's sequence
/// and hash, and the stream versions seen since the walk began.
struct Chain {
    seq: u64,
    hash: String,
    versions: HashMap<String, u64>,
}

impl Chain {
    /// Admit the next line, or say precisely why it can't follow.
    fn admit(
        &mut self,
        line: &[u8],
        offset: u64,
        stored_version: impl Fn(&str) -> Result<u64>,
    ) -> Result<(String, u64, uuid::Uuid)> {
        let seq = self.seq + 1;
        let damaged = |reason: String| StoreError::Damaged {
            seq,
            offset,
            reason,
        };
        let rec = decode(seq, line).map_err(|e| match e {
            StoreError::CorruptEvent { reason, .. } => damaged(reason),
            other => other,
        })?;
        if rec.prev_hash != self.hash {
            return Err(damaged(format!(
                "the record names {:?} as the previous record's hash, but record {} hashes to {:?}",
                rec.prev_hash, self.seq, self.hash
            )));
        }
        let current = match self.versions.get(&rec.stream) {
            Some(v) => *v,
            None => stored_version(&rec.stream)?,
        };
        if rec.version != current + 1 {
            return Err(damaged(format!(
                "the record is version {} of stream `{}`, which is at version {current}",
                rec.version, rec.stream
            )));
        }
        self.seq = seq;
        self.hash = sha256_hex(line);
        self.versions.insert(rec.stream.clone(), rec.version);
        Ok((rec.stream, rec.version, rec.id))
    }
}

/// What [`repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// Records that form an intact chain from the start and were kept.
    pub events_kept: u64,
    /// The first damaged record's sequence and byte offset, and why (None
    /// when the records were intact and only the index was rebuilt).
    pub damaged_at: Option<(u64, u64)>,
    pub reason: Option<String>,
    /// Whole lines moved aside: each may have been an acknowledged event.
    pub acknowledged_set_aside: u64,
    /// An unterminated last line (never acknowledged) moved aside with them.
    pub torn_bytes_set_aside: u64,
    /// Where the damaged suffix now lives (relative to the data directory).
    pub quarantine_file: Option<String>,
    /// Where the old index now lives (relative to the data directory).
    pub old_index: Option<String>,
}

/// Set the damaged suffix of the log in `dir` aside and re-index the rest.
/// Must run with no log open on `dir` (herdd stopped). Deletes nothing: the
/// suffix goes to `quarantine/events-MS-from-seq-N.jsonl` and the old sled
/// index to `quarantine/index-MS/`.
pub fn repair(dir: &Path) -> Result<RepairReport> {
    let log_path = dir.join(LOG_FILE);
    let io = |p: &Path, e| StoreError::io(p, e);
    let file = std::fs::File::open(&log_path).map_err(|e| io(&log_path, e))?;
    let mut reader = BufReader::new(file);
    let mut chain = Chain {
        seq: 0,
        hash: String::new(),
        versions: HashMap::new(),
    };
    let mut line = Vec::new();
    let mut offset = 0u64;
    let mut report = RepairReport::default();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| io(&log_path, e))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // A torn last line: never acknowledged, set aside with the rest.
            report.damaged_at = Some((chain.seq + 1, offset));
            report.reason = Some("an unterminated last line (a write that never finished)".into());
            break;
        }
        match chain.admit(&line[..n - 1], offset, |_| Ok(0)) {
            Ok(_) => offset += n as u64,
            Err(StoreError::Damaged {
                seq,
                offset,
                reason,
            }) => {
                report.damaged_at = Some((seq, offset));
                report.reason = Some(reason);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    report.events_kept = chain.seq;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let quarantine = dir.join("quarantine");
    std::fs::create_dir_all(&quarantine).map_err(|e| io(&quarantine, e))?;
    if let Some((seq, cut)) = report.damaged_at {
        let name = format!("events-{stamp}-from-seq-{seq}.jsonl");
        let target = quarantine.join(&name);
        let mut src = std::fs::File::open(&log_path).map_err(|e| io(&log_path, e))?;
        std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(cut))
            .map_err(|e| io(&log_path, e))?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| io(&target, e))?;
        let mut suffix = BufReader::new(src);
        let mut whole = 0u64;
        let mut torn = 0u64;
        loop {
            line.clear();
            let n = suffix
                .read_until(b'\n', &mut line)
                .map_err(|e| io(&log_path, e))?;
            if n == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                whole += 1;
            } else {
                torn = n as u64;
            }
            out.write_all(&line).map_err(|e| io(&target, e))?;
        }
        out.sync_all().map_err(|e| io(&target, e))?;
        sync_dir(&quarantine)?;
        report.acknowledged_set_aside = whole;
        report.torn_bytes_set_aside = torn;
        report.quarantine_file = Some(format!("log/quarantine/{name}"));
        // Only now that the suffix is safe elsewhere, cut it here.
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(&log_path)
            .map_err(|e| io(&log_path, e))?;
        log.set_len(cut)
            .and_then(|_| log.sync_all())
            .map_err(|e| io(&log_path, e))?;
    }
    // The index may point past the cut or be the damage itself: set it
    // aside and let the next open index every intact record again.
    let old_index: PathBuf = quarantine.join(format!("index-{stamp}"));
    let mut moved = false;
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if SLED_FILES
            .iter()
            .any(|f| name == *f || name.starts_with("snap."))
        {
            if !moved {
                std::fs::create_dir_all(&old_index).map_err(|e| io(&old_index, e))?;
                moved = true;
            }
            std::fs::rename(entry.path(), old_index.join(&name))
                .map_err(|e| io(&entry.path(), e))?;
        }
    }
    if moved {
        sync_dir(dir)?;
        // Opening indexes every intact record again; the count proves it.
        report.events_kept = crate::log::EventLog::open(dir)?.head_seq();
        report.old_index = Some(format!(
            "log/quarantine/{}",
            old_index.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    Ok(report)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}
