//! The daemon's shared state: the store, a live projection that follows the
//! log, and in-memory progress of running jobs.
//!
//! Every write goes through [`State::record`], which appends (durably) and
//! then waits until the projection has folded that event in, so a client that
//! got an answer reads its own writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use herd_core::model::{HerdEvent, Stored};
use herd_core::Projection;
use herd_store::{EventLog, ExpectedVersion, NewEvent, RecordedEvent, Store};
use tokio::sync::{watch, Notify, RwLock};
use uuid::Uuid;

pub use herd_core::wire::Progress;

pub struct State {
    pub store: Store,
    pub data_dir: PathBuf,
    pub projection: RwLock<Projection>,
    applied: watch::Sender<u64>,
    pub progress: std::sync::Mutex<BTreeMap<Uuid, Progress>>,
    /// Wakes the scheduler when something it cares about changed.
    pub wake: Notify,
}

impl State {
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(data_dir)?;
        let projection = rebuild(&store.log)?;
        let (applied, _) = watch::channel(projection.last_seq);
        let state = Arc::new(State {
            store,
            data_dir: data_dir.to_path_buf(),
            projection: RwLock::new(projection),
            applied,
            progress: Default::default(),
            wake: Notify::new(),
        });
        // Follow the log: the projection is a fold of what is durable.
        let follower = state.clone();
        let from = follower.applied.borrow().to_owned() + 1;
        let mut sub = state.store.log.subscribe(from);
        tokio::spawn(async move {
            while let Ok(rec) = sub.next().await {
                let seq = rec.seq;
                follower.projection.write().await.apply(&stored(&rec));
                follower.applied.send_replace(seq);
                // Metric points never change what can be scheduled.
                if rec.event_type != "JobMetrics" {
                    follower.wake.notify_one();
                }
            }
        });
        Ok(state)
    }

    /// Append events to a stream (durably) and wait until they are visible.
    pub async fn record(&self, stream: &str, events: Vec<HerdEvent>) -> anyhow::Result<u64> {
        let events = events.iter().map(new_event).collect();
        let r = self
            .store
            .log
            .append_async(stream, ExpectedVersion::Any, events)
            .await?;
        let mut rx = self.applied.subscribe();
        rx.wait_for(|s| *s >= r.last_seq).await?;
        Ok(r.last_seq)
    }

    pub async fn record_one(&self, stream: &str, event: HerdEvent) -> anyhow::Result<u64> {
        self.record(stream, vec![event]).await
    }

    /// `text` with the data directory's absolute path written as `DATA`:
    /// what is recorded and shown to clients names no server paths.
    pub fn without_server_paths(&self, text: &str) -> String {
        text.replace(&*self.data_dir.display().to_string(), "DATA")
    }

    pub fn work_dir(&self, job: Uuid) -> PathBuf {
        self.data_dir.join("work").join(job.to_string())
    }

    pub fn tree_cache(&self, hash: &str) -> PathBuf {
        self.data_dir.join("cache").join("trees").join(hash)
    }
}

// The glue between the generic store and herd's typed events.

/// A typed event as the store appends it (a fresh UUID v7 id).
pub fn new_event(event: &HerdEvent) -> NewEvent {
    let encoded = event.encode();
    let mut e = NewEvent::from_raw(encoded.event_type, encoded.payload);
    e.schema_version = encoded.schema_version;
    e
}

/// A stored record as the fold reads it.
pub fn stored(rec: &RecordedEvent) -> Stored<'_> {
    Stored {
        seq: rec.seq,
        timestamp_ms: rec.timestamp_ms,
        event_type: &rec.event_type,
        schema_version: rec.schema_version,
        payload: rec.payload.get(),
    }
}

/// Fold the whole log from the beginning.
pub fn rebuild(log: &EventLog) -> herd_store::Result<Projection> {
    let mut p = Projection::default();
    loop {
        let batch = log.read_all(p.last_seq + 1, 4096)?;
        if batch.is_empty() {
            return Ok(p);
        }
        for rec in &batch {
            p.apply(&stored(rec));
        }
    }
}
