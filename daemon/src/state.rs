//! The daemon's shared state: the store, the live views that follow the log
//! (projection and metric index, checkpointed to the view store), and
//! in-memory progress of running jobs.
//!
//! Every write goes through [`State::record`], which appends (durably) and
//! then waits until the views have folded that event in, so a client that
//! got an answer reads its own writes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herd_core::model::{HerdEvent, JobView, Stored};
use herd_core::Projection;
use herd_store::{EventLog, ExpectedVersion, NewEvent, RecordedEvent, Store};
use tokio::sync::{watch, Notify, RwLock};
use uuid::Uuid;

use crate::metrics::lod::{Sampled, Window};
use crate::metrics::{filed_attempt, MetricIndex, ELAPSED};
use crate::views::{Through, ViewStore, ViewsError};

pub use herd_core::wire::Progress;

/// Events folded between checkpoints at most (bounds what a rebuild holds).
const CHECKPOINT_EVERY: u64 = 50_000;
/// Metric points folded between checkpoints at most: one 10M-point run is
/// a few thousand events, and its tail must not all wait in memory.
const CHECKPOINT_POINTS: u64 = 1_000_000;

/// The projection and the metric index, as of event `through`, with the view
/// store that holds what is not resident. Derefs to the projection.
pub struct Live {
    pub projection: Projection,
    pub metrics: MetricIndex,
    views: Arc<ViewStore>,
    through: Through,
    since_checkpoint: u64,
    points_since_checkpoint: u64,
}

impl Live {
    fn new(views: Arc<ViewStore>) -> Self {
        Live {
            projection: Projection::default(),
            metrics: MetricIndex::default(),
            views,
            through: Through::default(),
            since_checkpoint: 0,
            points_since_checkpoint: 0,
        }
    }

    fn checkpoint_due(&self) -> bool {
        self.since_checkpoint >= CHECKPOINT_EVERY
            || self.points_since_checkpoint >= CHECKPOINT_POINTS
    }

    /// A job's view: resident, or read from the view store.
    pub fn job(&self, id: Uuid) -> Result<Option<Cow<'_, JobView>>, ViewsError> {
        if let Some(j) = self.projection.jobs.get(&id) {
            return Ok(Some(Cow::Borrowed(j)));
        }
        if !self.projection.has_job(&id) {
            return Ok(None);
        }
        Ok(Some(Cow::Owned(self.views.job(id)?)))
    }

    /// A job's metric series for one attempt (all, or the names given).
    pub fn series(
        &self,
        job: Uuid,
        attempt: u32,
        names: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Vec<(u64, f64)>>, ViewsError> {
        self.metrics.series(&self.views, job, attempt, names)
    }

    /// The same series sampled for `points` pixels over `window`.
    pub fn sampled(
        &self,
        job: Uuid,
        attempt: u32,
        names: Option<&[&str]>,
        points: usize,
        window: Window,
    ) -> Result<BTreeMap<String, Sampled>, ViewsError> {
        self.metrics
            .sampled(&self.views, job, attempt, names, points, window)
    }
}

impl std::ops::Deref for Live {
    type Target = Projection;
    fn deref(&self) -> &Projection {
        &self.projection
    }
}

pub struct State {
    pub store: Store,
    pub views: Arc<ViewStore>,
    pub data_dir: PathBuf,
    pub projection: RwLock<Live>,
    applied: watch::Sender<u64>,
    pub progress: std::sync::Mutex<BTreeMap<Uuid, Progress>>,
    /// Wakes the scheduler when something it cares about changed.
    pub wake: Notify,
    /// Held while a unique name is checked and recorded.
    pub naming: tokio::sync::Mutex<()>,
}

impl State {
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(data_dir)?;
        let views = open_views(&data_dir.join("views"))?;
        let live = load_views(&store.log, views.clone())?;
        let (applied, _) = watch::channel(live.last_seq);
        let state = Arc::new(State {
            store,
            views,
            data_dir: data_dir.to_path_buf(),
            projection: RwLock::new(live),
            applied,
            progress: Default::default(),
            wake: Notify::new(),
            naming: tokio::sync::Mutex::new(()),
        });
        // Follow the log: the views are a fold of what is durable.
        let follower = state.clone();
        let from = follower.applied.borrow().to_owned() + 1;
        let mut sub = state.store.log.subscribe(from);
        tokio::spawn(async move {
            while let Ok(rec) = sub.next().await {
                let seq = rec.seq;
                let mut live = follower.projection.write().await;
                let folded = fold(&mut live, &rec).and_then(|()| {
                    if live.checkpoint_due() {
                        checkpoint(&mut live)?;
                    }
                    Ok(())
                });
                if let Err(e) = folded {
                    // The views can no longer follow the record: stop rather
                    // than answer from views that miss an event.
                    let _ = follower.views.clear();
                    eprintln!(
                        "herdd: {e}; the views will be rebuilt from the log at the next start"
                    );
                    std::process::exit(70);
                }
                drop(live);
                follower.applied.send_replace(seq);
                // Metric points never change what can be scheduled.
                if rec.event_type != "JobMetrics" {
                    follower.wake.notify_one();
                }
            }
        });
        // Checkpoint what changed about once a second.
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(state) = weak.upgrade() else { return };
                if let Err(e) = state.checkpoint().await {
                    tracing::warn!("checkpointing views: {e}");
                }
            }
        });
        Ok(state)
    }

    /// Save the views now (also at shutdown, then made durable).
    pub async fn checkpoint(&self) -> Result<(), ViewsError> {
        let mut live = self.projection.write().await;
        if live.since_checkpoint > 0 {
            checkpoint(&mut live)?;
        }
        Ok(())
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

/// Open the view store; one that does not open (damaged files) is derived
/// data: set aside and started afresh, to be rebuilt from the log.
pub fn open_views(dir: &Path) -> anyhow::Result<Arc<ViewStore>> {
    match ViewStore::open(dir) {
        Ok(v) => Ok(Arc::new(v)),
        Err(e) => {
            let aside = dir.with_extension(format!("damaged-{}", now_ms()));
            eprintln!(
                "herdd: the view store does not open ({e}); moved it to DATA/{} and rebuilding it from the log",
                aside.file_name().unwrap_or_default().to_string_lossy()
            );
            std::fs::rename(dir, &aside)?;
            Ok(Arc::new(ViewStore::open(dir)?))
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// The views at the log's head: the last checkpoint if it was taken of this
/// log by this code, else a rebuild; then the events after it. A checkpoint
/// that does not read back is rebuilt too (it is derived; the log is whole).
pub fn load_views(log: &EventLog, views: Arc<ViewStore>) -> anyhow::Result<Live> {
    match load_checkpoint(log, views.clone()) {
        Ok(live) => Ok(live),
        Err(e) if e.downcast_ref::<ViewsError>().is_some() => {
            eprintln!("herdd: {e}; rebuilding the views from the log");
            views.clear()?;
            load_checkpoint(log, views)
        }
        Err(e) => Err(e),
    }
}

fn load_checkpoint(log: &EventLog, views: Arc<ViewStore>) -> anyhow::Result<Live> {
    let stored = match views.through()? {
        Some(t) if t.seq == 0 => Some(t),
        Some(t) => match log.get(t.seq)? {
            Some(rec) if rec.id == t.id && rec.prev_hash == t.prev_hash => Some(t),
            _ => None,
        },
        None => None,
    };
    let mut live = Live::new(views.clone());
    match stored {
        Some(t) => {
            live.projection = views.load(&t)?;
            live.through = t;
        }
        None => {
            views.clear()?;
            if log.head_seq() > 0 {
                eprintln!(
                    "herdd: building the views (DATA/views) from {} recorded events; once",
                    log.head_seq()
                );
            }
        }
    }
    loop {
        let batch = log.read_all(live.last_seq + 1, 4096)?;
        if batch.is_empty() {
            break;
        }
        for rec in &batch {
            fold(&mut live, rec)?;
            if live.checkpoint_due() {
                checkpoint(&mut live)?;
            }
        }
    }
    checkpoint(&mut live)?;
    Ok(live)
}

/// Fold one record into the views: bring back the view of an evicted job it
/// is about, file its metric points, apply it.
pub fn fold(live: &mut Live, rec: &RecordedEvent) -> Result<(), ViewsError> {
    if rec.seq <= live.last_seq {
        return Ok(());
    }
    let Live {
        projection,
        metrics,
        views,
        through,
        since_checkpoint,
        points_since_checkpoint,
    } = live;
    let event = HerdEvent::from_recorded(&stored(rec));
    if let Some(job) = event.as_ref().ok().and_then(HerdEvent::job) {
        if projection.has_job(&job) && !projection.jobs.contains_key(&job) {
            projection.make_resident(views.job(job)?);
        }
    }
    if let Ok(HerdEvent::JobMetrics {
        job,
        attempt,
        points,
    }) = &event
    {
        if let Some(j) = projection.jobs.get(job) {
            let filed = filed_attempt(*attempt, j.attempts);
            // The current attempt's points are all counted in metric_points.
            let fresh = filed == j.attempts && j.metric_points == 0;
            *points_since_checkpoint += points.len() as u64;
            let last_step = points.iter().map(|p| p.step).max();
            let points = points.iter().map(|p| (p.name.as_str(), p.step, p.value));
            metrics.add(views, *job, filed, fresh, points)?;
            // When each step was recorded, for charts by wall time.
            if let Some(step) = last_step {
                let start = j.started_ms.unwrap_or(j.submitted_ms);
                let secs = rec.timestamp_ms.saturating_sub(start) as f64 / 1000.0;
                metrics.add(views, *job, filed, fresh, [(ELAPSED, step, secs)])?;
            }
        }
    }
    projection.apply_decoded(rec.seq, rec.timestamp_ms, event);
    *through = Through {
        seq: rec.seq,
        id: rec.id,
        prev_hash: rec.prev_hash.clone(),
    };
    *since_checkpoint += 1;
    Ok(())
}

fn checkpoint(live: &mut Live) -> Result<(), ViewsError> {
    live.views
        .checkpoint(&mut live.projection, &mut live.metrics, &live.through)?;
    live.since_checkpoint = 0;
    live.points_since_checkpoint = 0;
    Ok(())
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

/// Fold the whole log from the beginning, in memory only (the pure fold the
/// checkpointed views must always equal).
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
