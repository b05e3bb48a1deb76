//! The one place that knows how events are laid out on disk.
//!
//! Record bytes go to an append-only JSON Lines file, `events.jsonl`: one
//! record per line, written once at the end and never rewritten, so
//! `cat events.jsonl` shows the whole history. That file is the truth; sled
//! holds an index into it. We measured why (see BENCHMARKS.md): sled rewrites
//! whole leaf nodes, so bulk record bytes cost it ~1.8x write amplification
//! and ~200 MB/s with fsync, and leaves bigger than ~128 KiB go to side files
//! that its flush never syncs. A plain append file has neither problem, and
//! every sled value here stays a few KiB.
//!
//! A commit is: write the group's records at the end of the file and
//! `fdatasync` it (the one sync an append waits for), then apply one sled
//! batch with the index entries and the head pointer. sled persists that
//! batch on its own schedule; after a crash its head pointer may lag the
//! file, and opening the log re-indexes the records past it (see
//! `log::recover`). Bytes after the last whole, chained record are the tail
//! of a group that was never acknowledged and are cut off.
//!
//! sled key layout (integers big-endian so byte order is numeric order):
//!   `c` first_seq                 -> chunk: file offset u64, count u32, count x u32 record lengths
//!   `s` stream 0x00 first_version -> run: first_seq u64, count u64 (contiguous versions)
//!   `h` stream                    -> current stream version u64
//!   `i` id[0..6] first_seq        -> n x (id[6..16], varint seq delta from the previous entry,
//!                                    the first from first_seq)
//!   `mhead`                       -> last indexed seq u64, its end in the file u64, hex sha256 of that record
//!   `mformat`                     -> FORMAT
//!
//! Ids are bucketed by their first six bytes, which for UUID v7 is the
//! millisecond they were made: one bucket entry per group and millisecond
//! instead of one key per event, and a lookup is one prefix scan. Random
//! (v4) ids get a bucket each; ids that all share their first six bytes
//! (a client counting from a fixed prefix) would make one bucket that every
//! lookup scans whole, so such clients should use UUID v7.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Result, StoreError};

mod keys;

use keys::{
    chunk_key, decode_chunk, decode_run, id_prefix, key, put_varint, run_key, stream_head_key,
    Chunk, Cursor,
};

const HEAD_KEY: &[u8] = b"mhead";
const FORMAT_KEY: &[u8] = b"mformat";
const FORMAT: &[u8] = b"herd-events/2 jsonl+sled-index";
pub(crate) const LOG_FILE: &str = "events.jsonl";
/// What sled keeps beside the record file (plus `snap.*`): the index, which
/// `recovery::repair` may set aside and rebuild from the records.
pub(crate) const SLED_FILES: &[&str] = &["conf", "db", "blobs"];
/// Records per chunk entry: bounds the bytes read to fetch one event.
const CHUNK_RECORDS: usize = 256;
/// Ids per bucket entry: keeps every sled value a few KiB.
const BUCKET_IDS: usize = 256;

pub(crate) struct Backend {
    db: sled::Db,
    /// The record file, opened read+write; positioned reads and writes only.
    log: File,
    path: PathBuf,
}

impl Drop for Backend {
    /// Persist the index on a clean close so the next open has nothing to
    /// re-index; a failure here only costs that re-indexing.
    fn drop(&mut self) {
        let _ = self.db.flush();
    }
}

/// The committed end of the log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Head {
    pub(crate) seq: u64,
    /// Hex sha256 of the last record ("" when empty).
    pub(crate) hash: String,
    /// Committed length of the record file.
    pub(crate) log_end: u64,
}

/// One append's events: versions `first_version..` of `stream` are
/// sequences `first_seq..`, `count` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) first_version: u64,
    pub(crate) first_seq: u64,
    pub(crate) count: u64,
}

/// The index entries of consecutive records (one group commit, or the
/// records recovered after a crash).
#[derive(Default)]
pub(crate) struct GroupIndex {
    /// Length of each record without its newline, in sequence order.
    pub(crate) lengths: Vec<u32>,
    /// Sequence of the first record.
    pub(crate) first_seq: u64,
    pub(crate) runs: Vec<(String, Run)>,
    pub(crate) stream_versions: BTreeMap<String, u64>,
    pub(crate) ids: Vec<(Uuid, u64)>,
    /// Hash of the last record.
    pub(crate) head_hash: String,
}

/// sled reports a held file lock as WouldBlock, sometimes wrapped in an
/// error of its own whose text says so.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

fn be(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn read_head(db: &sled::Db) -> Result<Head> {
    match db.get(HEAD_KEY).map_err(be)? {
        None => Ok(Head::default()),
        Some(v) => {
            let mut c = Cursor {
                bytes: &v,
                what: "head pointer",
            };
            let seq = c.u64()?;
            let log_end = c.u64()?;
            let hash = std::str::from_utf8(c.bytes)
                .map_err(|_| StoreError::Backend("head pointer hash is not UTF-8".into()))?
                .to_string();
            Ok(Head { seq, hash, log_end })
        }
    }
}

/// The index head of the log in `dir` as its files stand, without opening
/// the log: None when there is no index, an error when it can't be read.
/// For `repair`, which must know what was acknowledged before it changes
/// anything.
pub(crate) fn index_head(dir: &Path) -> Result<Option<Head>> {
    if !dir.join("db").exists() {
        return Ok(None);
    }
    let db = sled::Config::new().path(dir).open().map_err(|e| {
        StoreError::Backend(format!("opening sled database at {}: {e}", dir.display()))
    })?;
    let head = read_head(&db)?;
    drop(db);
    Ok(Some(head))
}

/// Acknowledged records `first..=last` are not whole in a file of `len`
/// bytes, where they were indexed up to `end`; `first` starts at `offset`.
pub(crate) fn missing_words(first: u64, last: u64, offset: u64, len: u64, end: u64) -> String {
    let events = if first == last {
        format!("acknowledged event {first} is")
    } else {
        format!("acknowledged events {first}–{last} are")
    };
    let torn = if len > offset {
        format!(
            " (event {first} is cut {} bytes into its record)",
            len - offset
        )
    } else {
        String::new()
    };
    format!(
        "{events} missing: the file is {len} bytes, but the index recorded acknowledged records up to byte {end}{torn}"
    )
}

impl Backend {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        // sled releases its file lock only when its last I/O thread lets go,
        // a moment after the previous handle in this process was dropped; a
        // lock still held after a few seconds belongs to someone else.
        let started = std::time::Instant::now();
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Err(sled::Error::Io(e))
                    if is_lock_error(&e) && started.elapsed() < std::time::Duration::from_secs(3) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if is_lock_error(&e) => {
                    return Err(StoreError::Backend(format!(
                        "{} is locked by another process (is another herdd using this data directory?)",
                        dir.display()
                    )))
                }
                other => {
                    break other.map_err(|e| {
                        StoreError::Backend(format!(
                            "opening sled database at {}: {e}",
                            dir.display()
                        ))
                    })?
                }
            }
        };
        match db.get(FORMAT_KEY).map_err(be)? {
            Some(f) if f.as_ref() == FORMAT => {}
            Some(f) => {
                return Err(StoreError::Backend(format!(
                    "{} holds event log format {:?}; this herd reads {:?}",
                    dir.display(),
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                )))
            }
            None if db.get(HEAD_KEY).map_err(be)?.is_some() => {
                return Err(StoreError::Backend(format!(
                    "{} holds an event log from an earlier herd format (records inside sled); \
                     this herd reads {:?}",
                    dir.display(),
                    String::from_utf8_lossy(FORMAT)
                )))
            }
            None => {
                db.insert(FORMAT_KEY, FORMAT).map_err(be)?;
                db.flush().map_err(be)?;
            }
        }
        let log_path = dir.join(LOG_FILE);
        if !log_path.exists() {
            let acknowledged = read_head(&db)?.seq;
            if acknowledged > 0 {
                return Err(StoreError::Damaged {
                    seq: 1,
                    offset: 0,
                    reason: format!(
                        "the log is gone: {} does not exist, but the index recorded {acknowledged} acknowledged events",
                        log_path.display()
                    ),
                });
            }
        }
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(|e| StoreError::io(&log_path, e))?;
        Ok(Backend {
            db,
            log,
            path: dir.to_path_buf(),
        })
    }

    fn log_path(&self) -> PathBuf {
        self.path.join(LOG_FILE)
    }

    /// The file's bytes from `from` to its end: records not yet indexed.
    /// A file shorter than `from` lost indexed records: that is corruption.
    pub(crate) fn tail(&self, from: u64, seq: u64) -> Result<Vec<u8>> {
        let path = self.log_path();
        let len = self
            .log
            .metadata()
            .map_err(|e| StoreError::io(&path, e))?
            .len();
        if len < from {
            return Err(StoreError::CorruptEvent {
                seq,
                reason: format!(
                    "{} is {len} bytes but records up to byte {from} were indexed: the file was truncated",
                    path.display()
                ),
            });
        }
        let mut buf = vec![0u8; (len - from) as usize];
        self.log
            .read_exact_at(&mut buf, from)
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(buf)
    }

    /// Bytes free for us on the disk holding the log (None if unknown).
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: fstatvfs fills a local struct for a descriptor we own.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            (libc::fstatvfs(self.log.as_raw_fd(), &mut st) == 0)
                .then(|| st.f_bavail as u64 * st.f_frsize as u64)
        }
    }

    /// Cut the file to `len`: what lies past it was never acknowledged.
    pub(crate) fn truncate(&self, len: u64) -> Result<()> {
        self.log
            .set_len(len)
            .and_then(|_| self.log.sync_all())
            .map_err(|e| StoreError::io(self.log_path(), e))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn head(&self) -> Result<Head> {
        read_head(&self.db)
    }

    /// Where record `seq` starts in the file, by the index (0 for seq 0).
    pub(crate) fn record_offset(&self, seq: u64) -> Result<u64> {
        if seq == 0 {
            return Ok(0);
        }
        let mut found = None;
        self.for_each_chunk_entry(seq, |s, offset, _| {
            if s == seq {
                found = Some(offset);
            }
            s < seq
        })?;
        found.ok_or_else(|| StoreError::CorruptEvent {
            seq,
            reason: "missing from the index".into(),
        })
    }

    /// When the file is shorter than the index's head says: the first
    /// acknowledged record it no longer holds whole, its offset, and what
    /// is missing, in words.
    pub(crate) fn missing_acknowledged(&self, head: &Head) -> Result<Option<(u64, u64, String)>> {
        let path = self.log_path();
        let len = self
            .log
            .metadata()
            .map_err(|e| StoreError::io(&path, e))?
            .len();
        if len >= head.log_end {
            return Ok(None);
        }
        let mut first = None;
        self.for_each_chunk_entry(1, |seq, offset, record_len| {
            if offset + record_len as u64 + 1 > len {
                first = Some((seq, offset));
                return false;
            }
            true
        })?;
        let (seq, offset) = first.unwrap_or((head.seq, len));
        Ok(Some((
            seq,
            offset,
            missing_words(seq, head.seq, offset, len, head.log_end),
        )))
    }

    /// Call `f(seq, offset, length)` for each indexed record from the chunk
    /// holding `from` on, without reading the file, until it returns false.
    fn for_each_chunk_entry(
        &self,
        from: u64,
        mut f: impl FnMut(u64, u64, u32) -> bool,
    ) -> Result<()> {
        for chunk in self.chunks_from(from) {
            let chunk = chunk?;
            let mut offset = chunk.offset;
            for (i, &l) in chunk.lengths.iter().enumerate() {
                if !f(chunk.first_seq + i as u64, offset, l) {
                    return Ok(());
                }
                offset += l as u64 + 1;
            }
        }
        Ok(())
    }

    pub(crate) fn stream_version(&self, stream: &str) -> Result<u64> {
        match self.db.get(stream_head_key(stream)).map_err(be)? {
            None => Ok(0),
            Some(v) => Cursor {
                bytes: &v,
                what: "stream head",
            }
            .u64(),
        }
    }

    /// Every stored (id, seq) whose id starts with the same six bytes as `id`.
    pub(crate) fn ids_like(&self, id: &Uuid) -> Result<Vec<(Uuid, u64)>> {
        let mut out = Vec::new();
        let prefix = id_prefix(id);
        for item in self.db.scan_prefix(key(b'i', &[&prefix])) {
            let (k, v) = item.map_err(be)?;
            let mut seq = Cursor {
                bytes: &k[7..],
                what: "event id index key",
            }
            .u64()?;
            let mut c = Cursor {
                bytes: &v,
                what: "event id index",
            };
            while !c.bytes.is_empty() {
                let mut bytes = [0u8; 16];
                bytes[..6].copy_from_slice(&prefix);
                bytes[6..].copy_from_slice(&c.take::<10>()?);
                seq += c.varint()?;
                out.push((Uuid::from_bytes(bytes), seq));
            }
        }
        Ok(out)
    }

    /// The runs of `stream` that hold versions >= `from`, in order.
    pub(crate) fn runs_from(
        &self,
        stream: &str,
        from: u64,
    ) -> impl Iterator<Item = Result<Run>> + '_ {
        let lo = run_key(stream, 0);
        let hi = run_key(stream, u64::MAX);
        let prefix_len = lo.len() - 8;
        // The run holding `from` may start before it.
        let start = match self.db.range(lo..=run_key(stream, from)).next_back() {
            Some(Ok((k, _))) => k.to_vec(),
            _ => run_key(stream, from),
        };
        self.db.range(start..=hi).map(move |item| {
            let (k, v) = item.map_err(be)?;
            let first_version = Cursor {
                bytes: &k[prefix_len..],
                what: "stream index key",
            }
            .u64()?;
            decode_run(&v, first_version)
        })
    }

    fn chunks_from(&self, seq: u64) -> impl Iterator<Item = Result<Chunk>> + '_ {
        let start = match self.db.range(chunk_key(0)..=chunk_key(seq)).next_back() {
            Some(Ok((k, _))) => k.to_vec(),
            _ => chunk_key(seq),
        };
        self.db.range(start..chunk_key(u64::MAX)).map(|item| {
            let (k, v) = item.map_err(be)?;
            decode_chunk(&k, &v)
        })
    }

    fn read_chunk(&self, chunk: &Chunk) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; chunk.byte_len() as usize];
        self.log
            .read_exact_at(&mut buf, chunk.offset)
            .map_err(|e| StoreError::CorruptEvent {
                seq: chunk.first_seq,
                reason: format!(
                    "reading {} bytes at offset {} of {}: {e}",
                    buf.len(),
                    chunk.offset,
                    self.log_path().display()
                ),
            })?;
        Ok(buf)
    }

    /// Call `f(seq, byte offset in the file, record bytes)` for every record
    /// with `from <= seq <= to`, in order, until it returns false. A gap in
    /// the index is an error.
    pub(crate) fn for_each_record(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mut expected = from;
        for chunk in self.chunks_from(from) {
            let chunk = chunk?;
            if chunk.first_seq > to {
                break;
            }
            if chunk.first_seq > expected {
                return Err(StoreError::CorruptEvent {
                    seq: expected,
                    reason: format!(
                        "missing from the index; the next chunk starts at {}",
                        chunk.first_seq
                    ),
                });
            }
            let bytes = self.read_chunk(&chunk)?;
            let mut at = 0usize;
            for (i, &len) in chunk.lengths.iter().enumerate() {
                let seq = chunk.first_seq + i as u64;
                let record = &bytes[at..at + len as usize];
                at += len as usize + 1;
                if seq < from {
                    continue;
                }
                if seq > to || !f(seq, chunk.offset + (at - len as usize - 1) as u64, record)? {
                    return Ok(());
                }
                expected = seq + 1;
            }
        }
        if expected <= to {
            return Err(StoreError::CorruptEvent {
                seq: expected,
                reason: "committed but missing from the index".into(),
            });
        }
        Ok(())
    }

    /// Make records durable: write them at `at` (the end of the committed
    /// file) and `fdatasync`. When this returns, the records survive a crash.
    pub(crate) fn write_records(&self, bytes: &[u8], at: u64) -> Result<()> {
        self.log
            .write_all_at(bytes, at)
            .and_then(|_| self.log.sync_data())
            .map_err(|e| StoreError::io(self.log_path(), e))
    }

    /// Index records that are already durable in the file at `at`, in one
    /// atomic sled batch. Returns the file offset after the last of them.
    pub(crate) fn index(&self, group: GroupIndex, at: u64) -> Result<u64> {
        let mut batch = sled::Batch::default();
        let mut offset = at;
        for (i, lengths) in group.lengths.chunks(CHUNK_RECORDS).enumerate() {
            let mut v = Vec::with_capacity(12 + 4 * lengths.len());
            v.extend_from_slice(&offset.to_be_bytes());
            v.extend_from_slice(&(lengths.len() as u32).to_be_bytes());
            for &l in lengths {
                v.extend_from_slice(&l.to_be_bytes());
                offset += l as u64 + 1;
            }
            let first = group.first_seq + (i * CHUNK_RECORDS) as u64;
            batch.insert(chunk_key(first), v);
        }
        for (stream, run) in &group.runs {
            let mut v = run.first_seq.to_be_bytes().to_vec();
            v.extend_from_slice(&run.count.to_be_bytes());
            batch.insert(run_key(stream, run.first_version), v);
        }
        for (stream, version) in &group.stream_versions {
            batch.insert(stream_head_key(stream), &version.to_be_bytes());
        }
        let mut ids = group.ids;
        ids.sort_by_key(|(id, seq)| (id_prefix(id), *seq));
        for bucket in ids.chunk_by(|a, b| id_prefix(&a.0) == id_prefix(&b.0)) {
            for part in bucket.chunks(BUCKET_IDS) {
                let mut v = Vec::with_capacity(11 * part.len());
                let mut prev = part[0].1;
                for (id, seq) in part {
                    v.extend_from_slice(&id.as_bytes()[6..]);
                    put_varint(&mut v, seq - prev);
                    prev = *seq;
                }
                batch.insert(
                    key(b'i', &[&id_prefix(&part[0].0), &part[0].1.to_be_bytes()]),
                    v,
                );
            }
        }
        let last_seq = group.first_seq + group.lengths.len() as u64 - 1;
        let mut head = last_seq.to_be_bytes().to_vec();
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(group.head_hash.as_bytes());
        batch.insert(HEAD_KEY, head);
        self.db.apply_batch(batch).map_err(be)?;
        Ok(offset)
    }

    /// Persist the index now (it is also persisted in the background).
    pub(crate) fn flush_index(&self) -> Result<()> {
        self.db.flush().map_err(be).map(|_| ())
    }

    /// Test hook: remove the id index entries sharing `id`'s bucket.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn drop_id_bucket(&self, id: &Uuid) -> Result<()> {
        for item in self.db.scan_prefix(key(b'i', &[&id_prefix(id)])) {
            let (k, _) = item.map_err(be)?;
            self.db.remove(k).map_err(be)?;
        }
        Ok(())
    }

    /// Test hook: change a committed record's bytes in place (same length),
    /// to prove that reads and `verify` notice.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn mutate_record(&self, seq: u64, f: &mut dyn FnMut(&mut [u8])) -> Result<()> {
        let chunk = self
            .chunks_from(seq)
            .next()
            .transpose()?
            .filter(|c| c.first_seq <= seq && seq < c.end_seq())
            .ok_or_else(|| StoreError::Invalid(format!("no record {seq}")))?;
        let before: u64 = chunk.lengths[..(seq - chunk.first_seq) as usize]
            .iter()
            .map(|&l| l as u64 + 1)
            .sum();
        let mut bytes = vec![0u8; chunk.lengths[(seq - chunk.first_seq) as usize] as usize];
        let at = chunk.offset + before;
        let io = |e| StoreError::io(self.log_path(), e);
        self.log.read_exact_at(&mut bytes, at).map_err(io)?;
        f(&mut bytes);
        self.log.write_all_at(&bytes, at).map_err(io)?;
        self.log.sync_data().map_err(io)
    }
}
