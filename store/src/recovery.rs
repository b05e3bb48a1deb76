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
    if let Some((seq, offset, reason)) = backend.missing_acknowledged(&head)? {
        return Err(StoreError::Damaged {
            seq,
            offset,
            reason,
        });
    }
    let tail = backend.tail(head.log_end, head.seq)?;
    check_indexed(backend, &head)?;
    let mut report = RecoveryReport::default();
    if tail.is_empty() {
        return Ok((head, report));
    }
    let mut chain = Chain::after_index(&head, backend.record_offset(head.seq)?);
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
///
/// A record is vouched for only by what comes after it: the next record's
/// link, or for the index's last record the hash the index kept. So when
/// record N does not name record N-1's hash, record N-1 is the first one
/// nothing vouches for, and that is where the damage is named (and where
/// `repair` cuts): an edited record, not the innocent one after it.
fn check_indexed(backend: &Backend, head: &Head) -> Result<()> {
    if head.seq == 0 {
        return Ok(());
    }
    let mut prev = String::new();
    let mut prev_offset = 0;
    backend.for_each_record(1, head.seq, |seq, offset, bytes| {
        let link = prev_hash_field(bytes);
        if link != Some(prev.as_bytes()) {
            // A record that is not record `seq` (a duplicated or garbage
            // line) is itself the damage, as when walking the tail.
            if let Err(StoreError::CorruptEvent { reason, .. }) = decode(seq, bytes) {
                return Err(StoreError::Damaged {
                    seq,
                    offset,
                    reason,
                });
            }
            let link = link.map(|l| String::from_utf8_lossy(l).into_owned());
            return Err(broken_link(
                seq,
                offset,
                prev_offset,
                &prev,
                link.as_deref(),
            ));
        }
        prev = sha256_hex(bytes);
        prev_offset = offset;
        Ok(true)
    })?;
    if prev != head.hash {
        return Err(changed_last(head.seq, prev_offset, &prev, &head.hash));
    }
    Ok(())
}

/// Record `seq` names `link` (None: none can be read) where record `seq-1`
/// hashes to `prev_hash`: record `seq-1` is the first nothing vouches for.
fn broken_link(
    seq: u64,
    offset: u64,
    prev_offset: u64,
    prev_hash: &str,
    link: Option<&str>,
) -> StoreError {
    if seq == 1 {
        return StoreError::Damaged {
            seq,
            offset,
            reason: "the first record does not start the hash chain".into(),
        };
    }
    let named = match link {
        Some(l) => format!("names {l:?} as its hash"),
        None => "names no readable hash for it".into(),
    };
    StoreError::Damaged {
        seq: seq - 1,
        offset: prev_offset,
        reason: format!(
            "the record changed after it was written: it hashes to {prev_hash:?}, but record {seq} after it {named}"
        ),
    }
}

fn changed_last(seq: u64, offset: u64, actual: &str, acknowledged: &str) -> StoreError {
    StoreError::Damaged {
        seq,
        offset,
        reason: format!(
            "the record's bytes differ from what was acknowledged: it hashes to {actual}, but the index recorded {acknowledged} for it; it changed after it was written"
        ),
    }
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

/// Where a walk along the chain stands: the last admitted record's sequence,
/// hash and offset, the last sequence the index vouches for, and the stream
/// versions seen since the walk began.
struct Chain {
    seq: u64,
    hash: String,
    offset: u64,
    /// Records up to here were proven by the index (its head hash).
    vouched: u64,
    versions: HashMap<String, u64>,
}

impl Chain {
    fn new() -> Self {
        Chain {
            seq: 0,
            hash: String::new(),
            offset: 0,
            vouched: 0,
            versions: HashMap::new(),
        }
    }

    /// A walk that starts after the index's head, which `check_indexed` proved.
    fn after_index(head: &Head, head_offset: u64) -> Self {
        Chain {
            seq: head.seq,
            hash: head.hash.clone(),
            offset: head_offset,
            vouched: head.seq,
            versions: HashMap::new(),
        }
    }

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
            if self.vouched == self.seq {
                // The record before is proven: this one's link changed.
                return Err(damaged(format!(
                    "the record names {:?} as the previous record's hash, but record {} hashes to {:?}",
                    rec.prev_hash, self.seq, self.hash
                )));
            }
            return Err(broken_link(
                seq,
                offset,
                self.offset,
                &self.hash,
                Some(&rec.prev_hash),
            ));
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
        self.offset = offset;
        self.versions.insert(rec.stream.clone(), rec.version);
        Ok((rec.stream, rec.version, rec.id))
    }
}

/// A repair that lost events leaves its report in the quarantine folder
/// under this suffix until the loss is recorded as an event (the caller
/// renames it then): a crash in between can't launder the loss.
pub const PENDING_SUFFIX: &str = ".pending.json";

/// What [`repair`] found, and did when it was allowed to.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepairReport {
    /// Records that form an intact chain from the start and were kept.
    pub events_kept: u64,
    /// The first damaged record's sequence and byte offset, and why (None
    /// when the records were intact and only the index was rebuilt).
    pub damaged_at: Option<(u64, u64)>,
    pub reason: Option<String>,
    /// What the index says was acknowledged: its last sequence (None when
    /// there was no index, or it could not be read: `index_note` says why).
    pub index_head: Option<u64>,
    pub index_note: Option<String>,
    /// Events lost, first and last sequence: set aside, or missing from the
    /// file though the index recorded them. Each may have been acknowledged.
    pub lost: Option<(u64, u64)>,
    /// How many of the lost events the index recorded as acknowledged.
    pub acknowledged_lost: u64,
    /// Whole lines moved aside: each may have been an acknowledged event.
    pub acknowledged_set_aside: u64,
    /// An unterminated last line moved aside with them (never acknowledged
    /// unless the index recorded it: then it counts in `lost`).
    pub torn_bytes_set_aside: u64,
    /// Where the damaged suffix now lives (relative to the data directory).
    pub quarantine_file: Option<String>,
    /// Where the old index now lives (relative to the data directory).
    pub old_index: Option<String>,
    /// False when events would be lost and the loss was not accepted:
    /// then nothing was changed.
    pub applied: bool,
}

impl RepairReport {
    /// What repair found, in one sentence naming sequences: "acknowledged
    /// events 28–30 are missing", "the log is gone: 30 acknowledged events".
    pub fn finding(&self) -> String {
        match (self.damaged_at, &self.reason) {
            (Some((seq, offset)), Some(reason)) => {
                format!("damaged at sequence {seq} (byte {offset}): {reason}")
            }
            _ => format!("every record is intact ({} events)", self.events_kept),
        }
    }
}

/// The record file as repair reads it: whole lines, the bytes of an
/// unterminated last one, whether the file exists.
struct Scan {
    exists: bool,
    /// (offset, line without its newline)
    lines: Vec<(u64, Vec<u8>)>,
    torn: Vec<u8>,
}

fn scan(log_path: &Path) -> Result<Scan> {
    let file = match std::fs::File::open(log_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Scan {
                exists: false,
                lines: vec![],
                torn: vec![],
            })
        }
        Err(e) => return Err(StoreError::io(log_path, e)),
    };
    let mut reader = BufReader::new(file);
    let mut out = Scan {
        exists: true,
        lines: vec![],
        torn: vec![],
    };
    let mut offset = 0u64;
    loop {
        let mut line = Vec::new();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| StoreError::io(log_path, e))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            out.torn = line;
            break;
        }
        line.pop();
        out.lines.push((offset, line));
        offset += n as u64;
    }
    Ok(out)
}

/// Find the first damage in the log in `dir`, judged against what the
/// index says was acknowledged. With `accept_loss`, or when nothing
/// acknowledged is lost, set the damaged suffix aside and re-index the
/// rest; otherwise change nothing and report what would be lost.
///
/// Must run with no log open on `dir` (herdd stopped). Deletes nothing:
/// the suffix goes to `quarantine/events-MS-from-seq-N.jsonl` and the old
/// sled index to `quarantine/index-MS/`.
pub fn repair(dir: &Path, accept_loss: bool) -> Result<RepairReport> {
    let log_path = dir.join(LOG_FILE);
    let io = |p: &Path, e| StoreError::io(p, e);
    let mut report = RepairReport::default();
    let head = match crate::backend::index_head(dir) {
        Ok(Some(h)) => {
            report.index_head = Some(h.seq);
            Some(h)
        }
        Ok(None) => {
            report.index_note = Some(
                "there is no index: which events were acknowledged is known only from the records"
                    .into(),
            );
            None
        }
        Err(e) => {
            report.index_note = Some(format!(
                "the index could not be read ({e}): which events were acknowledged is known only from the records"
            ));
            None
        }
    };
    let acknowledged = head.as_ref().map_or(0, |h| h.seq);
    let file = scan(&log_path)?;
    // Walk the chain; `cut` is the first line (index into file.lines) set aside.
    let mut chain = Chain::new();
    let mut cut = file.lines.len();
    for (i, (offset, line)) in file.lines.iter().enumerate() {
        if let Err(e) = chain.admit(line, *offset, |_| Ok(0)) {
            let StoreError::Damaged {
                seq,
                offset,
                reason,
            } = e
            else {
                return Err(e);
            };
            report.damaged_at = Some((seq, offset));
            report.reason = Some(reason);
            cut = (seq - 1) as usize;
            break;
        }
        if let Some(h) = head.as_ref().filter(|h| h.seq == chain.seq) {
            if chain.hash != h.hash {
                let StoreError::Damaged {
                    seq,
                    offset,
                    reason,
                } = changed_last(h.seq, *offset, &chain.hash, &h.hash)
                else {
                    unreachable!("changed_last names damage")
                };
                report.damaged_at = Some((seq, offset));
                report.reason = Some(reason);
                cut = i;
                break;
            }
            chain.vouched = chain.seq;
        }
    }
    let kept = cut as u64;
    let whole_after = file.lines.len() as u64 - kept;
    let end_of_kept = file.lines.get(cut).map_or_else(
        || file.lines.last().map_or(0, |(o, l)| o + l.len() as u64 + 1),
        |(o, _)| *o,
    );
    if report.damaged_at.is_none() && kept < acknowledged {
        // Every record in the file is intact, but the file ends too soon.
        let file_len = end_of_kept + file.torn.len() as u64;
        let h = head.as_ref().expect("acknowledged > 0 means an index");
        report.damaged_at = Some((kept + 1, end_of_kept));
        report.reason = Some(if !file.exists {
            format!(
                "the log is gone: {} does not exist, but the index recorded {acknowledged} acknowledged events",
                log_path.display()
            )
        } else {
            crate::backend::missing_words(kept + 1, acknowledged, end_of_kept, file_len, h.log_end)
        });
    }
    if report.damaged_at.is_none() && !file.torn.is_empty() {
        // Past everything acknowledged: a write that never finished.
        report.damaged_at = Some((kept + 1, end_of_kept));
        report.reason = Some("an unterminated last line (a write that never finished)".into());
    }
    let last_lost = acknowledged.max(kept + whole_after);
    if last_lost > kept {
        report.lost = Some((kept + 1, last_lost));
        report.acknowledged_lost = acknowledged.saturating_sub(kept);
    }
    report.events_kept = kept;
    if report.lost.is_some() && !accept_loss {
        return Ok(report);
    }
    report.applied = true;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let quarantine = dir.join("quarantine");
    std::fs::create_dir_all(&quarantine).map_err(|e| io(&quarantine, e))?;
    let pending = report
        .lost
        .map(|_| quarantine.join(format!("repair-{stamp}{PENDING_SUFFIX}")));
    if let Some((seq, _)) = report
        .damaged_at
        .filter(|_| whole_after > 0 || !file.torn.is_empty())
    {
        let name = format!("events-{stamp}-from-seq-{seq}.jsonl");
        let target = quarantine.join(&name);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| io(&target, e))?;
        for (_, line) in &file.lines[cut..] {
            out.write_all(line)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| io(&target, e))?;
        }
        out.write_all(&file.torn).map_err(|e| io(&target, e))?;
        out.sync_all().map_err(|e| io(&target, e))?;
        sync_dir(&quarantine)?;
        report.acknowledged_set_aside = whole_after;
        report.torn_bytes_set_aside = file.torn.len() as u64;
        report.quarantine_file = Some(format!("log/quarantine/{name}"));
    }
    if let Some(pending) = &pending {
        // Before anything is cut: the loss must reach the record even if
        // this process dies before its caller appends the event.
        let bytes = serde_json::to_vec_pretty(&report).expect("a report serializes");
        std::fs::write(pending, bytes)
            .and_then(|_| std::fs::File::open(pending)?.sync_all())
            .map_err(|e| io(pending, e))?;
        sync_dir(&quarantine)?;
    }
    if report.quarantine_file.is_some() {
        // Only now that the suffix is safe elsewhere, cut it here.
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(&log_path)
            .map_err(|e| io(&log_path, e))?;
        log.set_len(end_of_kept)
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
        report.old_index = Some(format!(
            "log/quarantine/{}",
            old_index.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    // Opening indexes every intact record again; the count proves it.
    report.events_kept = crate::log::EventLog::open(dir)?.head_seq();
    Ok(report)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}
