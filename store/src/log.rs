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

use crate::backend::{self, Backend, WriteBatch};
use crate::error::{Result, StoreError};
use crate::event::{sha256_hex, AppendResult, ExpectedVersion, NewEvent, RecordedEvent};

/// Largest number of events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 100_000;
/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 256;
/// Largest encoded record. sled writes values over ~128 KiB to side files
/// that its flush never syncs, so a bigger event could be lost after an
/// acknowledgement; callers split large payloads (the API splits metric batches).
pub const MAX_RECORD_BYTES: usize = 120 * 1024;
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
        let (head_seq, head_hash) = backend.head()?;
        let (tx, rx) = mpsc::channel();
        let (head_watch, _) = watch::channel(head_seq);
        let shared = Arc::new(Shared {
            backend: backend.clone(),
            requests: Mutex::new(Some(tx)),
            head: Mutex::new(head_seq),
            head_changed: Condvar::new(),
            head_watch,
            writer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&shared);
        let handle = std::thread::Builder::new()
            .name("herd-store-writer".into())
            .spawn(move || Writer::new(backend, head_seq, head_hash).run(rx, weak))
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
        match self.shared.backend.event_bytes(seq)? {
            None => Ok(None),
            Some(bytes) => decode(seq, &bytes).map(Some),
        }
    }

    /// Up to `limit` events of the global log with sequence >= `from`.
    pub fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let head = self.head_seq();
        let mut out = Vec::new();
        for item in self.shared.backend.scan_events(from.max(1)).take(limit) {
            let (seq, bytes) = item?;
            if seq > head {
                break; // written by a group whose flush has not returned yet
            }
            out.push(decode(seq, &bytes)?);
        }
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
        let mut out = Vec::new();
        for seq in self
            .shared
            .backend
            .scan_stream(stream, from_version.max(1))
            .take(limit)
        {
            let seq = seq?;
            if seq > head {
                break;
            }
            let bytes =
                self.shared
                    .backend
                    .event_bytes(seq)?
                    .ok_or_else(|| StoreError::CorruptEvent {
                        seq,
                        reason: format!("indexed by stream `{stream}` but missing"),
                    })?;
            out.push(decode(seq, &bytes)?);
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
    /// each record names the hash of the one before, the stream index points
    /// back at it, and the head pointer matches the last record.
    pub fn verify_chain(&self) -> Result<ChainReport> {
        let backend = &self.shared.backend;
        let (head_seq, head_hash) = backend.head()?;
        let mut prev_hash = String::new();
        let mut expected_seq = 1u64;
        for item in backend.scan_events(1) {
            let (seq, bytes) = item?;
            if seq != expected_seq {
                return Err(StoreError::BrokenChain {
                    seq: expected_seq,
                    reason: format!("missing; next stored is {seq}"),
                });
            }
            let rec = decode(seq, &bytes)?;
            if rec.prev_hash != prev_hash {
                return Err(StoreError::BrokenChain {
                    seq,
                    reason: format!(
                        "prev_hash {} does not match the previous record's hash {}",
                        rec.prev_hash, prev_hash
                    ),
                });
            }
            let indexed = backend
                .scan_stream(&rec.stream, rec.version)
                .next()
                .transpose()?;
            if indexed != Some(seq) {
                return Err(StoreError::BrokenChain {
                    seq,
                    reason: format!(
                        "stream index of `{}` v{} points at {:?}",
                        rec.stream, rec.version, indexed
                    ),
                });
            }
            prev_hash = sha256_hex(&bytes);
            expected_seq += 1;
        }
        let last = expected_seq - 1;
        if last != head_seq || prev_hash != head_hash {
            return Err(StoreError::BrokenChain {
                seq: last,
                reason: format!("head pointer says seq {head_seq} hash {head_hash}, records end at {last} hash {prev_hash}"),
            });
        }
        Ok(ChainReport {
            events: last,
            last_hash: prev_hash,
        })
    }

    /// Test hook: overwrite a record's raw bytes, to prove verification notices.
    #[doc(hidden)]
    pub fn corrupt_record_for_test(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        self.shared.backend.raw_put(&backend::event_key(seq), bytes)
    }

    pub fn path(&self) -> &std::path::Path {
        self.shared.backend.path()
    }
}

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
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        // The envelope adds well under 1 KiB to the payload.
        let size = serde_json::to_vec(&e.payload)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
            + e.event_type.len()
            + 1024;
        if size > MAX_RECORD_BYTES {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` encodes to about {size} bytes; the limit is {MAX_RECORD_BYTES} (split it)"
            )));
        }
        if e.event_type.is_empty() {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` has an empty type"
            )));
        }
        if !seen.insert(e.id) {
            return Err(StoreError::Invalid(format!(
                "event id {} appears twice in one append to `{stream}`",
                e.id
            )));
        }
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

/// The writer thread's state: the chain head and a cache of stream versions.
struct Writer {
    backend: Arc<Backend>,
    seq: u64,
    hash: String,
    versions: HashMap<String, u64>,
    poisoned: Option<String>,
}

enum Outcome {
    Reply(Result<AppendResult>),
    /// Accepted into the batch; acknowledged only after the commit.
    Pending(AppendResult),
}

impl Writer {
    fn new(backend: Arc<Backend>, seq: u64, hash: String) -> Self {
        Writer {
            backend,
            seq,
            hash,
            versions: HashMap::new(),
            poisoned: None,
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

    fn version_of(&mut self, stream: &str, pending: &HashMap<String, u64>) -> Result<u64> {
        if let Some(v) = pending.get(stream) {
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
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64;
        let mut batch = WriteBatch::default();
        let mut pending_versions: HashMap<String, u64> = HashMap::new();
        let mut pending_ids: HashMap<Uuid, (u64, u64)> = HashMap::new();
        let mut seq = self.seq;
        let mut hash = self.hash.clone();
        let mut outcomes = Vec::with_capacity(group.len());
        for req in group {
            let outcome = self.stage(
                &req,
                now_ms,
                &mut batch,
                &mut pending_versions,
                &mut pending_ids,
                &mut seq,
                &mut hash,
            );
            outcomes.push((req.reply, outcome));
        }
        let committed = if batch.len > 0 {
            batch.set_head(seq, &hash);
            match self.backend.commit(batch) {
                Ok(()) => {
                    self.seq = seq;
                    self.hash = hash;
                    self.versions.extend(pending_versions);
                    true
                }
                Err(e) => {
                    self.poisoned = Some(e.to_string());
                    false
                }
            }
        } else {
            false
        };
        if committed {
            if let Some(shared) = shared.upgrade() {
                *shared.head.lock().expect("head lock") = self.seq;
                shared.head_changed.notify_all();
                shared.head_watch.send_replace(self.seq);
            }
        }
        for (reply, outcome) in outcomes {
            let result = match outcome {
                Outcome::Reply(r) => r,
                Outcome::Pending(r) if committed => Ok(r),
                Outcome::Pending(_) => Err(StoreError::Poisoned(
                    self.poisoned.clone().unwrap_or_default(),
                )),
            };
            let _ = reply.send(result);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        req: &AppendRequest,
        now_ms: u64,
        batch: &mut WriteBatch,
        pending_versions: &mut HashMap<String, u64>,
        pending_ids: &mut HashMap<Uuid, (u64, u64)>,
        seq: &mut u64,
        hash: &mut String,
    ) -> Outcome {
        // Idempotency: (seq, version) of ids already stored or staged.
        let mut known = Vec::new();
        for e in &req.events {
            let found = match pending_ids.get(&e.id) {
                Some(p) => Some(*p),
                None => match self.backend.seq_of_id(&e.id) {
                    Ok(Some(s)) => Some((s, 0)),
                    Ok(None) => None,
                    Err(err) => return Outcome::Reply(Err(err)),
                },
            };
            if let Some(f) = found {
                known.push(f);
            }
        }
        let current = match self.version_of(&req.stream, pending_versions) {
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
            let first_seq = known.iter().map(|k| k.0).min().unwrap_or(0);
            let last_seq = known.iter().map(|k| k.0).max().unwrap_or(0);
            return Outcome::Reply(Ok(AppendResult {
                first_seq,
                last_seq,
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
        let first_seq = *seq + 1;
        let mut version = current;
        for e in &req.events {
            *seq += 1;
            version += 1;
            let rec = RecordedEvent {
                seq: *seq,
                id: e.id,
                stream: req.stream.clone(),
                version,
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                timestamp_ms: now_ms,
                payload: e.payload.clone(),
                causation_id: e.causation_id,
                correlation_id: e.correlation_id,
                prev_hash: std::mem::take(hash),
            };
            let bytes = serde_json::to_vec(&rec).expect("serializing a JSON value cannot fail");
            *hash = sha256_hex(&bytes);
            batch.put(&backend::event_key(*seq), &bytes);
            batch.put(
                &backend::stream_key(&req.stream, version),
                &seq.to_be_bytes(),
            );
            batch.put(&backend::id_key(&e.id), &seq.to_be_bytes());
            pending_ids.insert(e.id, (*seq, version));
        }
        batch.put(
            &backend::stream_head_key(&req.stream),
            &version.to_be_bytes(),
        );
        pending_versions.insert(req.stream.clone(), version);
        Outcome::Pending(AppendResult {
            first_seq,
            last_seq: *seq,
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
