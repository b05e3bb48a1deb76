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
//!
//! This file: the handle, its reads and the checks an append passes before
//! it is queued. `writer.rs` the group commit, `subscription.rs` following
//! the log, `verify.rs` the full walk; what opening may cut is `recovery.rs`.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::backend::{Backend, GroupIndex, Head, Run};
use crate::error::{Result, StoreError};
use crate::event::{
    sha256_hex, write_record, AppendResult, ExpectedVersion, NewEvent, RecordParts, RecordedEvent,
};
use crate::recovery::{recover, RecoveryReport};

mod subscription;
mod verify;
mod writer;

pub use subscription::Subscription;
pub use verify::ChainReport;
use writer::Writer;

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
    /// Last committed (durable) sequence; subscriptions wait on it.
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
        *self.shared.head_watch.borrow()
    }

    pub fn stream_version(&self, stream: &str) -> Result<u64> {
        self.shared.backend.stream_version(stream)
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

    /// Test hook: change a stored record's bytes in place (the length stays),
    /// to prove that reads and verification notice.
    #[cfg(feature = "test-hooks")]
    pub fn corrupt_record_for_test(&self, seq: u64, mut f: impl FnMut(&mut [u8])) -> Result<()> {
        self.shared.backend.mutate_record(seq, &mut f)
    }

    /// Test hook: forget the id index entries of the bucket holding `id`,
    /// to prove that verification notices.
    #[cfg(feature = "test-hooks")]
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
        let limit = crate::event::MAX_PAYLOAD_DEPTH;
        if let Some(depth) = crate::event::json_deeper_than(e.payload.get().as_bytes(), limit) {
            return Err(StoreError::Invalid(format!(
                "event {i} of the append to `{stream}` is nested at least {depth} levels deep; the limit is {}",
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
