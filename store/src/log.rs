//! The append-only event log with group commit.
//!
//! One writer thread owns all appends. It drains whatever requests are queued,
//! checks each one's expected version, writes all of them in one atomic batch,
//! flushes once, and only then acknowledges every caller. Durability therefore
//! costs one fsync per group, not per event, and version checks never race.
//!
//! Readers go straight to the backend; a subscription follows the committed
//! head, so it can never see an event that is not durable, and it reads by
//! sequence number, so it can neither skip nor repeat one.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::backend::{Backend, GroupIndex, Head, Run};
use crate::error::{Result, StoreError};
use crate::event::{
    sha256_hex, write_record, AppendResult, ExpectedVersion, NewEvent, RecordParts, RecordedEvent,
};
use crate::recovery::{recover, RecoveryReport};

/// Largest number of events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 100_000;
/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 256;
/// Largest encoded record. Events are facts, not data: datasets and
/// checkpoints belong in the blob store; callers split large payloads (the
/// API splits metric batches).
pub const MAX_RECORD_BYTES: usize = 120 * 1024;
/// Appends are refused (NoSpace) while less than this, plus twice the
/// group's bytes, is free on the log's disk: room for the index to follow.
pub const FREE_SPACE_RESERVE: u64 = 8 * 1024 * 1024;
/// A group commit stops collecting requests once it holds this many events.
const MAX_GROUP_EVENTS: usize = 50_000;

struct AppendRequest {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<AppendResult>>,
}

struct Shared {
    backend: Arc<Backend>,
    requests: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    /// Last committed (durable) sequence, for blocking and async waiters.
    head: Mutex<u64>,
    head_changed: Condvar,
    head_watch: watch::Sender<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What opening did on its own (re-indexed records, a cut torn line).
    recovery: RecoveryReport,
}

impl Drop for Shared {
    /// Closing the queue ends the writer thread; wait for it so that the
    /// database is closed (and its file lock released) when the last handle goes.
    fn drop(&mut self) {
        self.requests.lock().map(|mut q| q.take()).ok();
        if let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

/// A handle to the log; cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

/// What `verify` found when the chain is intact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainReport {
    pub events: u64,
    pub last_hash: String,
}

impl EventLog {
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let backend = Arc::new(Backend::open(dir)?);
        let (head, recovery) = recover(&backend)?;
        let head_seq = head.seq;
        let (tx, rx) = mpsc::channel();
        let (head_watch, _) = watch::channel(head_seq);
        let shared = Arc::new(Shared {
            backend: backend.clone(),
            requests: Mutex::new(Some(tx)),
            head: Mutex::new(head_seq),
            head_changed: Condvar::new(),
            head_watch,
            writer: Mutex::new(None),
            recovery,
        });
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("herd-store-writer".into())
            .spawn(move || Writer::new(backend, head).run(rx, weak))
            .map_err(|e| StoreError::io(dir, e))?;
        *shared.writer.lock().expect("writer lock") = Some(handle);
        Ok(EventLog { shared })
    }

    fn submit(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<oneshot::Receiver<Result<AppendResult>>> {
        validate_append(stream, &events)?;
        let (reply, rx) = oneshot::channel();
        let req = AppendRequest {
            stream: stream.to_string(),
            expected,
            events,
            reply,
        };
        let guard = self.shared.requests.lock().expect("request queue lock");
        guard
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(req)
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Append atomically; returns once the events are durable. Blocking: do not
    /// call from inside an async task (use [`EventLog::append_async`]).
    pub fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.submit(stream, expected, events)?
            .blocking_recv()
            .map_err(|_| StoreError::Closed)?
    }

    pub async fn append_async(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.submit(stream, expected, events)?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Sequence number of the last durable event (0 when empty).
    pub fn head_seq(&self) -> u64 {
        *self.shared.head.lock().expect("head lock")
    }

    pub fn stream_version(&self, stream: &str) -> Result<u64> {
        self.shared.backend.stream_version(stream)
    }

    pub fn streams(&self) -> Result<Vec<String>> {
        self.shared.backend.streams().collect()
    }

    /// One event by global sequence.
    pub fn get(&self, seq: u64) -> Result<Option<RecordedEvent>> {
        if seq == 0 || seq > self.head_seq() {
            return Ok(None);
        }
        let mut found = None;
        self.shared
            .backend
            .for_each_record(seq, seq, |seq, _, bytes| {
                found = Some(decode(seq, bytes)?);
                Ok(false)
            })?;
        Ok(found)
    }

    /// Up to `limit` events of the global log with sequence >= `from`.
    pub fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let head = self.head_seq();
        let from = from.max(1);
        if from > head || limit == 0 {
            return Ok(Vec::new());
        }
        let to = head.min(from.saturating_add(limit as u64 - 1));
        let mut out = Vec::with_capacity((to - from + 1) as usize);
        self.shared
            .backend
            .for_each_record(from, to, |seq, _, bytes| {
                out.push(decode(seq, bytes)?);
                Ok(true)
            })?;
        Ok(out)
    }

    /// Up to `limit` events of one stream with version >= `from_version`.
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let head = self.head_seq();
        let from_version = from_version.max(1);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for run in self.shared.backend.runs_from(stream, from_version) {
            let run = run?;
            let skip = from_version.saturating_sub(run.first_version);
            if skip >= run.count {
                continue;
            }
            let want = (run.count - skip).min((limit - out.len()) as u64);
            let first = run.first_seq + skip;
            let last = first + want - 1;
            if first > head {
                break;
            }
            self.shared
                .backend
                .for_each_record(first, last.min(head), |seq, _, bytes| {
                    let rec = decode(seq, bytes)?;
                    if rec.stream != stream {
                        return Err(StoreError::CorruptEvent {
                            seq,
                            reason: format!(
                                "indexed for stream `{stream}` but belongs to `{}`",
                                rec.stream
                            ),
                        });
                    }
                    out.push(rec);
                    Ok(true)
                })?;
            if out.len() >= limit || last > head {
                break;
            }
        }
        Ok(out)
    }

    /// Every event from `from` on, first the stored ones, then live ones as
    /// they are committed, each exactly once and in order.
    pub fn subscribe(&self, from: u64) -> Subscription {
        Subscription {
            log: self.clone(),
            next: from.max(1),
            buffer: std::collections::VecDeque::new(),
            watch: self.shared.head_watch.subscribe(),
        }
    }

    /// Walk the whole chain: every record decodes, sequences are gap-free,
    /// each record names the hash of the one before, the stream index and
    /// the id index point back at it, and the head pointer matches the last
    /// record.
    pub fn verify_chain(&self) -> Result<ChainReport> {
        let backend = &self.shared.backend;
        let head = backend.head()?;
        let mut prev_hash = String::new();
        let mut last = 0u64;
        // The run last seen per stream: most records fall inside it.
        let mut runs: HashMap<String, Run> = HashMap::new();
        // The id bucket last loaded: consecutive v7 ids share one.
        let mut bucket: ([u8; 6], HashMap<Uuid, u64>) = ([0; 6], HashMap::new());
        let mut bucket_loaded = false;
        if head.seq > 0 {
            backend.for_each_record(1, head.seq, |seq, _, bytes| {
                let rec = decode(seq, bytes)?;
                if rec.prev_hash != prev_hash {
                    return Err(StoreError::BrokenChain {
                        seq,
                        reason: format!(
                            "prev_hash {} does not match the previous record's hash {}",
                            rec.prev_hash, prev_hash
                        ),
                    });
                }
                let covers = |r: &Run| {
                    r.first_version <= rec.version && rec.version < r.first_version + r.count
                };
                let run = match runs.get(&rec.stream).copied().filter(covers) {
                    Some(r) => Some(r),
                    None => backend
                        .runs_from(&rec.stream, rec.version)
                        .next()
                        .transpose()?
                        .filter(covers),
                };
                let indexed = run.map(|r| r.first_seq + (rec.version - r.first_version));
                if indexed != Some(seq) {
                    return Err(StoreError::BrokenChain {
                        seq,
                        reason: format!(
                            "stream index of `{}` v{} points at {:?}",
                            rec.stream, rec.version, indexed
                        ),
                    });
                }
                if let Some(r) = run {
                    runs.insert(rec.stream, r);
                }
                // Idempotent retries depend on the id index: it must know
                // every event, at its sequence.
                let prefix: [u8; 6] = rec.id.as_bytes()[..6].try_into().expect("16 bytes");
                if !bucket_loaded || bucket.0 != prefix {
                    bucket = (prefix, backend.ids_like(&rec.id)?.into_iter().collect());
                    bucket_loaded = true;
                }
                if bucket.1.get(&rec.id) != Some(&seq) {
                    return Err(StoreError::BrokenChain {
                        seq,
                        reason: format!(
                            "event id index has {} at {:?}",
                            rec.id,
                            bucket.1.get(&rec.id)
                        ),
                    });
                }
                prev_hash = sha256_hex(bytes);
                last = seq;
                Ok(true)
            })?;
        }
        if last != head.seq || prev_hash != head.hash {
            return Err(StoreError::BrokenChain {
                seq: last,
                reason: format!(
                    "head pointer says seq {} hash {}, records end at {last} hash {prev_hash}",
                    head.seq, head.hash
                ),
            });
        }
        Ok(ChainReport {
            events: last,
            last_hash: prev_hash,
        })
    }

    /// Test hook: change a stored record's bytes in place (the length stays),
    /// to prove that reads and verification notice.
    #[doc(hidden)]
    pub fn corrupt_record_for_test(&self, seq: u64, mut f: impl FnMut(&mut [u8])) -> Result<()> {
        self.shared.backend.mutate_record(seq, &mut f)
    }

    /// Test hook: forget the id index entries of the bucket holding `id`,
    /// to prove that verification notices.
    #[doc(hidden)]
    pub fn drop_id_bucket_for_test(&self, id: &Uuid) -> Result<()> {
        self.shared.backend.drop_id_bucket(id)
    }

    pub fn path(&self) -> &std::path::Path {
        self.shared.backend.path()
    }

    /// What opening the log did on its own: records re-indexed after a
    /// crash, bytes of a torn (never acknowledged) last line cut.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.shared.recovery
    }
}

/// Check an append before it reaches the writer; every refusal names the
/// stream and the event's index.
fn validate_append(stream: &str, events: &[NewEvent]) -> Result<()> {
    if stream.is_empty() || stream.len() > MAX_STREAM_NAME || stream.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "stream name must be 1..={MAX_STREAM_NAME} bytes without NUL, got {:?}",
            stream
        )));
    }
    if events.is_empty() {
        return Err(StoreError::Invalid(format!(
            "append to `{stream}` carries no events"
        )));
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::Invalid(format!(
            "append to `{stream}` carries {} events; the limit is {MAX_EVENTS_PER_APPEND}",
            events.len()
        )));
    }
    for (i, e) in events.iter().enumerate() {
        if e.event_type.is_empty() {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` has an empty type"
            )));
        }
        // Counting openers is cheap and bounds the depth; walk only when it could be too deep.
        let payload = e.payload.get().as_bytes();
        let openers = payload.iter().filter(|&&b| b == b'{' || b == b'[').count();
        let depth = if openers > crate::event::MAX_PAYLOAD_DEPTH {
            crate::event::json_depth(payload)
        } else {
            0
        };
        if depth > crate::event::MAX_PAYLOAD_DEPTH {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` nests {depth} levels deep; the limit is {}",
                crate::event::MAX_PAYLOAD_DEPTH
            )));
        }
        // The envelope adds well under 1 KiB to the payload.
        let size = e.payload.get().len() + e.event_type.len() + 1024;
        if size > MAX_RECORD_BYTES {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` encodes to about {size} bytes; the limit is {MAX_RECORD_BYTES} (split it)"
            )));
        }
    }
    let mut ids: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(StoreError::Invalid(format!(
            "event id {} appears twice in one append to `{stream}`",
            Uuid::from_u128(w[0])
        )));
    }
    Ok(())
}

pub(crate) fn decode(seq: u64, bytes: &[u8]) -> Result<RecordedEvent> {
    let rec: RecordedEvent =
        serde_json::from_slice(bytes).map_err(|e| StoreError::CorruptEvent {
            seq,
            reason: e.to_string(),
        })?;
    if rec.seq != seq {
        return Err(StoreError::CorruptEvent {
            seq,
            reason: format!("record claims sequence {}", rec.seq),
        });
    }
    Ok(rec)
}

/// The writer thread's state: the committed head and a cache of stream versions.
struct Writer {
    backend: Arc<Backend>,
    head: Head,
    versions: HashMap<String, u64>,
    poisoned: Option<String>,
    /// The staging buffer, kept between groups: a fresh multi-megabyte
    /// buffer per group costs page faults in the writer and in `write`.
    buffer: Vec<u8>,
}

enum Outcome {
    Reply(Result<AppendResult>),
    /// Accepted into the group; acknowledged only after the commit.
    Pending(AppendResult),
}

/// What the requests of one group have staged so far.
struct Staged {
    bytes: Vec<u8>,
    write: GroupIndex,
    seq: u64,
    hash: String,
    ids: HashMap<Uuid, u64>,
    now_ms: u64,
}

impl Writer {
    fn new(backend: Arc<Backend>, head: Head) -> Self {
        Writer {
            backend,
            head,
            versions: HashMap::new(),
            poisoned: None,
            buffer: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<AppendRequest>, shared: std::sync::Weak<Shared>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut events = group[0].events.len();
            while events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(r) => {
                        events += r.events.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group, &shared);
        }
    }

    fn version_of(&mut self, stream: &str, staged: &GroupIndex) -> Result<u64> {
        if let Some(v) = staged.stream_versions.get(stream) {
            return Ok(*v);
        }
        if let Some(v) = self.versions.get(stream) {
            return Ok(*v);
        }
        let v = self.backend.stream_version(stream)?;
        self.versions.insert(stream.to_string(), v);
        Ok(v)
    }

    /// Commit a group, publish the new head, then acknowledge: a caller that
    /// got its reply can read what it wrote.
    fn commit_group(&mut self, group: Vec<AppendRequest>, shared: &std::sync::Weak<Shared>) {
        if let Some(reason) = &self.poisoned {
            for req in group {
                let _ = req.reply.send(Err(StoreError::Poisoned(reason.clone())));
            }
            return;
        }
        let mut staged = Staged {
            bytes: std::mem::take(&mut self.buffer),
            write: GroupIndex {
                first_seq: self.head.seq + 1,
                ..GroupIndex::default()
            },
            seq: self.head.seq,
            hash: self.head.hash.clone(),
            ids: HashMap::new(),
            now_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64,
        };
        let mut outcomes = Vec::with_capacity(group.len());
        for req in group {
            let outcome = self.stage(&req, &mut staged);
            outcomes.push((req.reply, outcome));
        }
        let commit: Option<Result<()>> = if staged.seq > self.head.seq {
            staged.write.head_hash = staged.hash.clone();
            let versions = staged.write.stream_versions.clone();
            let at = self.head.log_end;
            // Refuse before writing when the disk is nearly full: the index
            // (sled) must never be the one to hit ENOSPC, since sled stops
            // for good after a failed write, and only a reopen heals it.
            let needed = FREE_SPACE_RESERVE + 2 * staged.bytes.len() as u64;
            let written = if self.backend.free_bytes().is_some_and(|free| free < needed) {
                Err(StoreError::NoSpace)
            } else {
                self.backend.write_records(&staged.bytes, at)
            };
            Some(match written {
                Ok(()) => match self.backend.index(staged.write, at) {
                    Ok(log_end) => {
                        self.buffer = std::mem::take(&mut staged.bytes);
                        self.buffer.clear();
                        self.head = Head {
                            seq: staged.seq,
                            hash: staged.hash,
                            log_end,
                        };
                        self.versions.extend(versions);
                        Ok(())
                    }
                    // The records are durable but the index is not: only a
                    // reopen (which re-indexes the file's tail) can go on.
                    Err(e) => {
                        self.poisoned = Some(e.to_string());
                        Err(StoreError::Poisoned(e.to_string()))
                    }
                },
                // Nothing of this group was acknowledged: cut whatever part
                // reached the file and keep taking writes (a full disk
                // recovers when space returns). If even the cut fails, the
                // file's end is unknown and only a reopen can tell.
                Err(StoreError::NoSpace) => {
                    self.buffer = std::mem::take(&mut staged.bytes);
                    self.buffer.clear();
                    Err(StoreError::NoSpace)
                }
                Err(e) => {
                    let no_space = matches!(&e, StoreError::Io { source, .. }
                        if source.raw_os_error() == Some(28) /* ENOSPC */
                            || source.kind() == std::io::ErrorKind::StorageFull);
                    self.buffer = std::mem::take(&mut staged.bytes);
                    self.buffer.clear();
                    match self.backend.truncate(at) {
                        Ok(()) if no_space => Err(StoreError::NoSpace),
                        Ok(()) => Err(e),
                        Err(cut) => {
                            self.poisoned =
                                Some(format!("{e}; then cutting the partial write failed: {cut}"));
                            Err(StoreError::Poisoned(
                                self.poisoned.clone().unwrap_or_default(),
                            ))
                        }
                    }
                }
            })
        } else {
            None // every request was answered while staging
        };
        let committed = matches!(commit, Some(Ok(())));
        if committed {
            if let Some(shared) = shared.upgrade() {
                *shared.head.lock().expect("head lock") = self.head.seq;
                shared.head_changed.notify_all();
                shared.head_watch.send_replace(self.head.seq);
            }
        }
        for (reply, outcome) in outcomes {
            let result = match outcome {
                Outcome::Reply(r) => r,
                Outcome::Pending(r) if committed => Ok(r),
                Outcome::Pending(_) => Err(match &commit {
                    Some(Err(StoreError::NoSpace)) => StoreError::NoSpace,
                    Some(Err(StoreError::Poisoned(why))) => StoreError::Poisoned(why.clone()),
                    Some(Err(e)) => {
                        StoreError::Backend(format!("the append was not recorded: {e}"))
                    }
                    _ => StoreError::Backend("the append was not recorded".into()),
                }),
            };
            let _ = reply.send(result);
        }
    }

    /// Sequences of the request's ids that are already stored or staged.
    fn known_ids(&self, req: &AppendRequest, staged: &Staged) -> Result<Vec<u64>> {
        let mut stored: HashMap<Uuid, u64> = HashMap::new();
        let mut scanned: Vec<[u8; 6]> = Vec::new();
        let mut known = Vec::new();
        for e in &req.events {
            if let Some(seq) = staged.ids.get(&e.id) {
                known.push(*seq);
                continue;
            }
            let prefix: [u8; 6] = e.id.as_bytes()[..6].try_into().expect("16 bytes");
            if !scanned.contains(&prefix) {
                scanned.push(prefix);
                stored.extend(self.backend.ids_like(&e.id)?);
            }
            if let Some(seq) = stored.get(&e.id) {
                known.push(*seq);
            }
        }
        Ok(known)
    }

    fn stage(&mut self, req: &AppendRequest, staged: &mut Staged) -> Outcome {
        // Idempotency: sequences of ids already stored or staged.
        let known = match self.known_ids(req, staged) {
            Ok(k) => k,
            Err(e) => return Outcome::Reply(Err(e)),
        };
        let current = match self.version_of(&req.stream, &staged.write) {
            Ok(v) => v,
            Err(e) => return Outcome::Reply(Err(e)),
        };
        if !known.is_empty() {
            if known.len() != req.events.len() {
                return Outcome::Reply(Err(StoreError::PartialDuplicate {
                    stream: req.stream.clone(),
                    stored: known.len(),
                    total: req.events.len(),
                }));
            }
            return Outcome::Reply(Ok(AppendResult {
                first_seq: known.iter().copied().min().unwrap_or(0),
                last_seq: known.iter().copied().max().unwrap_or(0),
                version: current,
                duplicate: true,
            }));
        }
        if !req.expected.admits(current) {
            return Outcome::Reply(Err(StoreError::Conflict {
                stream: req.stream.clone(),
                expected: req.expected.to_string(),
                current,
            }));
        }
        let first_seq = staged.seq + 1;
        let mut version = current;
        let w = &mut staged.write;
        let bytes = &mut staged.bytes;
        let json = |s: &str| serde_json::to_vec(s).expect("a string serializes");
        let stream_json = json(&req.stream);
        let mut type_json: (&str, Vec<u8>) = ("", Vec::new());
        for e in &req.events {
            staged.seq += 1;
            version += 1;
            if type_json.0 != e.event_type {
                type_json = (&e.event_type, json(&e.event_type));
            }
            let start = bytes.len();
            write_record(
                bytes,
                &RecordParts {
                    seq: staged.seq,
                    id: &e.id,
                    stream_json: &stream_json,
                    version,
                    event_type_json: &type_json.1,
                    schema_version: e.schema_version,
                    timestamp_ms: staged.now_ms,
                    payload: &e.payload,
                    causation_id: e.causation_id,
                    correlation_id: e.correlation_id,
                    prev_hash: &staged.hash,
                },
            );
            staged.hash = sha256_hex(&bytes[start..]);
            w.lengths.push((bytes.len() - start) as u32);
            bytes.push(b'\n');
            w.ids.push((e.id, staged.seq));
            staged.ids.insert(e.id, staged.seq);
        }
        w.runs.push((
            req.stream.clone(),
            Run {
                first_version: current + 1,
                first_seq,
                count: req.events.len() as u64,
            },
        ));
        w.stream_versions.insert(req.stream.clone(), version);
        Outcome::Pending(AppendResult {
            first_seq,
            last_seq: staged.seq,
            version,
            duplicate: false,
        })
    }
}

/// A gap-free, duplicate-free reader of the log from some sequence on.
pub struct Subscription {
    log: EventLog,
    next: u64,
    buffer: std::collections::VecDeque<RecordedEvent>,
    watch: watch::Receiver<u64>,
}

impl Subscription {
    fn refill(&mut self) -> Result<()> {
        if self.buffer.is_empty() && self.next <= self.log.head_seq() {
            let batch = self.log.read_all(self.next, 1024)?;
            if let Some(last) = batch.last() {
                self.next = last.seq + 1;
            }
            self.buffer.extend(batch);
        }
        Ok(())
    }

    /// The next event, waiting (blocking the thread) for it if need be; `None`
    /// when `timeout` passes first.
    pub fn next_blocking(&mut self, timeout: Duration) -> Result<Option<RecordedEvent>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.refill()?;
            if let Some(e) = self.buffer.pop_front() {
                return Ok(Some(e));
            }
            let shared = &self.log.shared;
            let guard = shared.head.lock().expect("head lock");
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if *guard < self.next {
                let _ = shared
                    .head_changed
                    .wait_timeout(guard, deadline - now)
                    .expect("head lock");
            }
        }
    }

    /// The next event, awaiting it if need be.
    pub async fn next(&mut self) -> Result<RecordedEvent> {
        loop {
            self.refill()?;
            if let Some(e) = self.buffer.pop_front() {
                return Ok(e);
            }
            let next = self.next;
            self.watch
                .wait_for(|head| *head >= next)
                .await
                .map_err(|_| StoreError::Closed)?;
        }
    }
}
