//! Metric series on disk: every metric point of every job, in blocks of up to
//! 512 points in the view store, so that the daemon's memory follows the
//! series being written, not the 10M points of history.
//!
//! In memory is only each live series' tail (its last, partial block and
//! what arrived since the last checkpoint). A series is keyed by job, the
//! attempt its points belong to (as the projection counts it: points of the
//! current attempt, or of attempt 0, go to the job's current attempt; late
//! points of a superseded attempt to their own) and name.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::views::{ViewStore, ViewsError};

/// Points per stored block: a 20k-point series is 40 reads.
pub const BLOCK: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    job: Uuid,
    attempt: u32,
    name: String,
}

/// Points of one series from block `first_block` on; the stored copy of
/// those blocks is stale while `dirty`.
#[derive(Debug, Default)]
struct Tail {
    first_block: u32,
    points: Vec<(u64, f64)>,
    dirty: bool,
}

#[derive(Debug, Default)]
pub struct MetricIndex {
    live: BTreeMap<SeriesKey, Tail>,
}

/// The attempt a point is filed under (see the module doc).
pub fn filed_attempt(point_attempt: u32, job_attempts: u32) -> u32 {
    if point_attempt == 0 || point_attempt >= job_attempts {
        job_attempts
    } else {
        point_attempt
    }
}

impl MetricIndex {
    /// Add points of one job and attempt, in logging order. `fresh`: the
    /// attempt has no points yet, so there is nothing stored to resume.
    pub fn add<'a>(
        &mut self,
        store: &ViewStore,
        job: Uuid,
        attempt: u32,
        fresh: bool,
        points: impl IntoIterator<Item = (&'a str, u64, f64)>,
    ) -> Result<(), ViewsError> {
        for (name, step, value) in points {
            let key = SeriesKey {
                job,
                attempt,
                name: name.to_string(),
            };
            let tail = match self.live.get_mut(&key) {
                Some(t) => t,
                None if fresh => self.live.entry(key).or_default(),
                None => {
                    // Resume after what is stored: its last block if partial.
                    let tail = match store.last_block(job, attempt, name)? {
                        Some((index, points)) if points.len() < BLOCK => Tail {
                            first_block: index,
                            points,
                            dirty: false,
                        },
                        Some((index, _)) => Tail {
                            first_block: index + 1,
                            ..Tail::default()
                        },
                        None => Tail::default(),
                    };
                    self.live.entry(key).or_insert(tail)
                }
            };
            tail.points.push((step, value));
            tail.dirty = true;
        }
        Ok(())
    }

    /// Series of one job and attempt (all names, or those in `names`).
    pub fn series(
        &self,
        store: &ViewStore,
        job: Uuid,
        attempt: u32,
        names: Option<&[&str]>,
    ) -> Result<BTreeMap<String, Vec<(u64, f64)>>, ViewsError> {
        let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
        let live_from = |name: &str| {
            let key = SeriesKey {
                job,
                attempt,
                name: name.to_string(),
            };
            self.live.get(&key)
        };
        store.for_each_block(job, attempt, names, |name, index, points| {
            // Blocks the tail holds are newer in memory.
            if live_from(name).is_none_or(|t| index < t.first_block) {
                out.entry(name.to_string()).or_default().extend(points);
            }
        })?;
        let lo = SeriesKey {
            job,
            attempt,
            name: String::new(),
        };
        for (key, tail) in self.live.range(lo..) {
            if key.job != job || key.attempt != attempt {
                break;
            }
            if names.is_none_or(|n| n.contains(&key.name.as_str())) && !tail.points.is_empty() {
                out.entry(key.name.clone())
                    .or_default()
                    .extend_from_slice(&tail.points);
            }
        }
        Ok(out)
    }

    /// Write what changed into `batch`; then keep in memory only the partial
    /// last blocks of series whose job is still `live`.
    pub fn checkpoint(&mut self, batch: &mut sled::Batch, live: impl Fn(Uuid) -> bool) {
        for (key, tail) in self.live.iter_mut().filter(|(_, t)| t.dirty) {
            for (i, chunk) in tail.points.chunks(BLOCK).enumerate() {
                let index = tail.first_block + i as u32;
                ViewStore::put_block(batch, key.job, key.attempt, &key.name, index, chunk);
            }
            tail.dirty = false;
            let full = tail.points.len() / BLOCK;
            tail.points.drain(..full * BLOCK);
            tail.first_block += full as u32;
        }
        self.live.retain(|k, t| live(k.job) && !t.points.is_empty());
    }

    /// Series tails held in memory (for tests and the scale benchmark).
    pub fn resident_points(&self) -> usize {
        self.live.values().map(|t| t.points.len()).sum()
    }
}
