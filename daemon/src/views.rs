//! The view store: the projection and the metric index checkpointed to disk
//! (a sled database in `DATA/views`), so that a restart loads them instead of
//! folding the whole log, and ended jobs' views leave memory.
//!
//! It is derived data, never the record: every checkpoint writes what changed
//! and the identity of the last event folded in (sequence, event id and the
//! hash chain before it) in one atomic batch. At open, views written by
//! other code (`VIEWS_VERSION`) or for another log (the event at that
//! sequence is not the one remembered, e.g. after `herdd repair`) are thrown
//! away and rebuilt from the log; otherwise the events after the checkpoint
//! are folded in. Deleting `DATA/views` is always safe.
//!
//! Keys: `m:` meta, `e:` experiments, `r:` rounds, `a:` artifacts, `j:` job
//! views, `w:` job rows, `s:` metric blocks (job, attempt, name, block), `t:`
//! their summaries (job, attempt, name, page; see `metrics/summary.rs`).

use std::path::Path;

use herd_core::model::{ArtifactView, ExperimentView, JobRow, JobView, RoundView, VIEWS_VERSION};
use herd_core::Projection;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metrics::summary::{BlockSummary, PAGE, RECORD};
use crate::metrics::MetricIndex;

#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    #[error("view store at DATA/views: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "view store at DATA/views: {key}: {reason} (delete DATA/views to rebuild it from the log)"
    )]
    Corrupt { key: String, reason: String },
}

/// The last event folded into a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Through {
    pub seq: u64,
    pub id: Uuid,
    /// The record's `prev_hash`: with `id`, names the whole log prefix.
    pub prev_hash: String,
}

#[derive(Serialize, Deserialize, Default)]
struct Counts {
    unknown_events: u64,
    undecodable: Vec<(u64, String)>,
    #[serde(default)]
    repairs: Vec<herd_core::model::RepairView>,
}

pub struct ViewStore {
    db: sled::Db,
}

const FORMAT: &[u8] = b"m:format";
const THROUGH: &[u8] = b"m:through";
const COUNTS: &[u8] = b"m:counts";

fn key(prefix: &[u8], id: &[u8]) -> Vec<u8> {
    [prefix, id].concat()
}

fn series_prefix(job: Uuid, attempt: u32, name: Option<&str>) -> Vec<u8> {
    prefixed(b"s:", job, attempt, name)
}

/// The key prefix of a series' summary pages (`t:`, laid out as `s:`).
fn summary_prefix(job: Uuid, attempt: u32, name: Option<&str>) -> Vec<u8> {
    prefixed(b"t:", job, attempt, name)
}

fn prefixed(tag: &[u8], job: Uuid, attempt: u32, name: Option<&str>) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(tag);
    k.extend_from_slice(job.as_bytes());
    k.extend_from_slice(&attempt.to_be_bytes());
    if let Some(name) = name {
        k.extend_from_slice(&(name.len() as u16).to_be_bytes());
        k.extend_from_slice(name.as_bytes());
    }
    k
}

impl ViewStore {
    /// Open (or create) the store. Its page cache is small: the point is to
    /// keep memory bounded, and reads mostly hit the OS page cache anyway.
    pub fn open(dir: &Path) -> Result<Self, ViewsError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(ViewStore { db })
    }

    fn format() -> Vec<u8> {
        format!("herd-views-2:{VIEWS_VERSION:016x}").into_bytes()
    }

    /// The checkpoint's last event, if the store holds views this code wrote.
    pub fn through(&self) -> Result<Option<Through>, ViewsError> {
        if self.db.get(FORMAT)?.as_deref() != Some(&Self::format()[..]) {
            return Ok(None);
        }
        match self.db.get(THROUGH)? {
            Some(v) => Ok(Some(decode(THROUGH, &v)?)),
            None => Ok(None),
        }
    }

    /// Forget everything (views from other code or another log).
    pub fn clear(&self) -> Result<(), ViewsError> {
        self.db.clear()?;
        self.db.insert(FORMAT, Self::format())?;
        Ok(())
    }

    /// Load a checkpoint: experiments, rounds, artifacts and every job's row;
    /// views of jobs not yet ended are made resident (the scheduler needs
    /// them), ended ones stay on disk.
    pub fn load(&self, through: &Through) -> Result<Projection, ViewsError> {
        let mut p = Projection {
            last_seq: through.seq,
            ..Projection::default()
        };
        if let Some(v) = self.db.get(COUNTS)? {
            let c: Counts = decode(COUNTS, &v)?;
            p.unknown_events = c.unknown_events;
            p.undecodable = c.undecodable;
            p.repairs = c.repairs;
        }
        for kv in self.db.scan_prefix(b"e:") {
            let (k, v) = kv?;
            let e: ExperimentView = decode(&k, &v)?;
            p.experiments.insert(e.id, e);
        }
        for kv in self.db.scan_prefix(b"r:") {
            let (k, v) = kv?;
            let r: RoundView = decode(&k, &v)?;
            p.rounds.insert(r.id, r);
        }
        for kv in self.db.scan_prefix(b"a:") {
            let (k, v) = kv?;
            let a: ArtifactView = decode(&k, &v)?;
            p.artifacts.insert(a.hash.clone(), a);
        }
        let mut live = vec![];
        for kv in self.db.scan_prefix(b"w:") {
            let (k, v) = kv?;
            let id = Uuid::from_slice(&k[2..]).map_err(|e| corrupt(&k, e))?;
            let row: JobRow = decode(&k, &v)?;
            if !row.status.is_final() {
                live.push(id);
            }
            p.insert_row(id, row);
        }
        for id in live {
            p.make_resident(self.job(id)?);
        }
        Ok(p)
    }

    /// The stored view of a job that has a row (as of the last checkpoint);
    /// a row without its view is damage, reported as such.
    pub fn job(&self, id: Uuid) -> Result<JobView, ViewsError> {
        let k = key(b"j:", id.as_bytes());
        match self.db.get(&k)? {
            Some(v) => decode(&k, &v),
            None => Err(ViewsError::Corrupt {
                key: format!("j:{id}"),
                reason: "a job row without its view".into(),
            }),
        }
    }

    /// Write everything that changed since the last checkpoint, and the
    /// event it is complete through, atomically; then evict ended jobs'
    /// views and their series tails from memory.
    pub fn checkpoint(
        &self,
        p: &mut Projection,
        metrics: &mut MetricIndex,
        through: &Through,
    ) -> Result<(), ViewsError> {
        let mut batch = sled::Batch::default();
        for id in &p.dirty.experiments {
            if let Some(e) = p.experiments.get(id) {
                batch.insert(key(b"e:", id.as_bytes()), json(e));
            }
        }
        for id in &p.dirty.rounds {
            if let Some(r) = p.rounds.get(id) {
                batch.insert(key(b"r:", id.as_bytes()), json(r));
            }
        }
        for hash in &p.dirty.artifacts {
            if let Some(a) = p.artifacts.get(hash) {
                batch.insert(key(b"a:", hash.as_bytes()), json(a));
            }
        }
        for id in &p.dirty.jobs {
            if let (Some(view), Some(row)) = (p.jobs.get(id), p.rows.get(id)) {
                batch.insert(key(b"j:", id.as_bytes()), json(view));
                batch.insert(key(b"w:", id.as_bytes()), json(row));
            }
        }
        let counts = Counts {
            unknown_events: p.unknown_events,
            undecodable: p.undecodable.clone(),
            repairs: p.repairs.clone(),
        };
        batch.insert(COUNTS, json(&counts));
        batch.insert(THROUGH, json(through));
        let live = |id: Uuid| p.jobs.get(&id).is_some_and(|j| !j.status.is_final());
        metrics.checkpoint(self, &mut batch, live)?;
        self.db.apply_batch(batch)?;
        let dirty = std::mem::take(&mut p.dirty);
        for id in dirty.jobs {
            if p.jobs.get(&id).is_some_and(|j| j.status.is_final()) {
                p.jobs.remove(&id);
            }
        }
        Ok(())
    }

    /// Make the last checkpoint durable (at shutdown; otherwise sled syncs
    /// on its own, and a lost checkpoint only means folding more at start).
    pub fn flush(&self) -> Result<(), ViewsError> {
        self.db.flush()?;
        Ok(())
    }

    /// Apply a batch a test built from the metric index alone.
    #[cfg(test)]
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<(), ViewsError> {
        Ok(self.db.apply_batch(batch)?)
    }

    pub(crate) fn put_block(
        batch: &mut sled::Batch,
        job: Uuid,
        attempt: u32,
        name: &str,
        index: u32,
        points: &[(u64, f64)],
    ) {
        let mut k = series_prefix(job, attempt, Some(name));
        k.extend_from_slice(&index.to_be_bytes());
        let mut v = Vec::with_capacity(points.len() * 16);
        for (step, value) in points {
            v.extend_from_slice(&step.to_le_bytes());
            v.extend_from_slice(&value.to_le_bytes());
        }
        batch.insert(k, v);
    }

    /// The last stored block of a series: its index and points.
    pub(crate) fn last_block(
        &self,
        job: Uuid,
        attempt: u32,
        name: &str,
    ) -> Result<Option<(u32, Vec<(u64, f64)>)>, ViewsError> {
        let prefix = series_prefix(job, attempt, Some(name));
        match self.db.scan_prefix(&prefix).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                let (_, index, points) = parse_block(&k, &v)?;
                Ok(Some((index, points)))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn put_summary_page(
        batch: &mut sled::Batch,
        job: Uuid,
        attempt: u32,
        name: &str,
        page: u32,
        records: Vec<u8>,
    ) {
        let mut k = summary_prefix(job, attempt, Some(name));
        k.extend_from_slice(&page.to_be_bytes());
        batch.insert(k, records);
    }

    /// One stored summary page, as records (see `metrics/summary.rs`).
    pub(crate) fn summary_page(
        &self,
        job: Uuid,
        attempt: u32,
        name: &str,
        page: u32,
    ) -> Result<Option<Vec<u8>>, ViewsError> {
        let mut k = summary_prefix(job, attempt, Some(name));
        k.extend_from_slice(&page.to_be_bytes());
        Ok(self.db.get(k)?.map(|v| v.to_vec()))
    }

    /// Every stored block summary of one series, in block order.
    pub(crate) fn summaries(
        &self,
        job: Uuid,
        attempt: u32,
        name: &str,
    ) -> Result<Vec<BlockSummary>, ViewsError> {
        let prefix = summary_prefix(job, attempt, Some(name));
        let mut out = vec![];
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let page = k[prefix.len()..]
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| corrupt(&k, "malformed summary page key"))?;
            if out.len() as u64 != page as u64 * PAGE as u64 || v.len() % RECORD != 0 {
                return Err(corrupt(&k, "summary page out of place"));
            }
            for record in v.chunks_exact(RECORD) {
                out.push(
                    BlockSummary::decode(record)
                        .ok_or_else(|| corrupt(&k, "malformed block summary"))?,
                );
            }
        }
        Ok(out)
    }

    /// The names of a job attempt's stored series.
    pub(crate) fn series_names(&self, job: Uuid, attempt: u32) -> Result<Vec<String>, ViewsError> {
        let prefix = summary_prefix(job, attempt, None);
        let mut names: Vec<String> = vec![];
        for kv in self.db.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let name = parse_name(&k)?;
            if names.last() != Some(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// One stored block's points.
    pub(crate) fn block(
        &self,
        job: Uuid,
        attempt: u32,
        name: &str,
        index: u32,
    ) -> Result<Vec<(u64, f64)>, ViewsError> {
        let mut k = series_prefix(job, attempt, Some(name));
        k.extend_from_slice(&index.to_be_bytes());
        match self.db.get(&k)? {
            Some(v) => Ok(parse_block(&k, &v)?.2),
            None => Err(corrupt(&k, "a summarized metric block is missing")),
        }
    }

    /// Every stored block of a job's attempt (names in `names`, or all), in
    /// order: by name, then block index.
    pub(crate) fn for_each_block(
        &self,
        job: Uuid,
        attempt: u32,
        names: Option<&[&str]>,
        mut f: impl FnMut(&str, u32, Vec<(u64, f64)>),
    ) -> Result<(), ViewsError> {
        let prefixes: Vec<Vec<u8>> = match names {
            Some(names) => names
                .iter()
                .map(|n| series_prefix(job, attempt, Some(n)))
                .collect(),
            None => vec![series_prefix(job, attempt, None)],
        };
        for prefix in prefixes {
            for kv in self.db.scan_prefix(&prefix) {
                let (k, v) = kv?;
                let (name, index, points) = parse_block(&k, &v)?;
                f(&name, index, points);
            }
        }
        Ok(())
    }
}

/// The series name in an `s:` or `t:` key: job(16) attempt(4) len(2) name
/// index(4).
fn parse_name(k: &[u8]) -> Result<String, ViewsError> {
    let bad = |reason: &str| corrupt(k, reason);
    if k.len() < 2 + 16 + 4 + 2 + 4 {
        return Err(bad("malformed metric key"));
    }
    let len = u16::from_be_bytes([k[22], k[23]]) as usize;
    if k.len() != 24 + len + 4 {
        return Err(bad("malformed metric key"));
    }
    Ok(std::str::from_utf8(&k[24..24 + len])
        .map_err(|_| bad("metric name is not UTF-8"))?
        .to_string())
}

fn parse_block(k: &[u8], v: &[u8]) -> Result<(String, u32, Vec<(u64, f64)>), ViewsError> {
    if !v.len().is_multiple_of(16) {
        return Err(corrupt(k, "malformed metric block"));
    }
    let name = parse_name(k)?;
    let index = u32::from_be_bytes(k[k.len() - 4..].try_into().expect("4 bytes"));
    let points = v
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                f64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
            )
        })
        .collect();
    Ok((name, index, points))
}

/// A key as an error names it: its prefix, then hex.
fn describe(k: &[u8]) -> String {
    let (prefix, rest) = k.split_at(2.min(k.len()));
    format!("{}{}", String::from_utf8_lossy(prefix), hex::encode(rest))
}

fn corrupt(k: &[u8], e: impl std::fmt::Display) -> ViewsError {
    ViewsError::Corrupt {
        key: describe(k),
        reason: e.to_string(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, ViewsError> {
    serde_json::from_slice(v).map_err(|e| corrupt(k, e))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("views serialize")
}
