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
use lod::{Block, Sampled, Window};
use summary::{BlockSummary, PAGE, RECORD};

pub mod lod;
pub mod summary;

/// herd's own series of each job: seconds from the attempt's start to the
/// recording of each metric batch, at the batch's last step (charts by wall
/// time map steps through it). Listed only when asked for by name; `@` opens
/// no name a run may log.
pub const ELAPSED: &str = "@elapsed_s";

/// Whether a series is herd's own (see [`ELAPSED`]).
pub fn is_internal(name: &str) -> bool {
    name.starts_with('@')
}

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
        // By series first (a batch has a few names and many points): one
        // key and one lookup per series, not per point.
        let mut by_name: Vec<(&str, Vec<(u64, f64)>)> = vec![];
        for (name, step, value) in points {
            match by_name.iter_mut().find(|(n, _)| *n == name) {
                Some((_, p)) => p.push((step, value)),
                None => by_name.push((name, vec![(step, value)])),
            }
        }
        for (name, points) in by_name {
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
            tail.points.extend(points);
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
            // Blocks the tail holds are newer in memory; herd's own series
            // only when named.
            if names.is_none() && is_internal(name) {
                return;
            }
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
            let wanted = match names {
                Some(n) => n.contains(&key.name.as_str()),
                None => !is_internal(&key.name),
            };
            if wanted && !tail.points.is_empty() {
                out.entry(key.name.clone())
                    .or_default()
                    .extend_from_slice(&tail.points);
            }
        }
        Ok(out)
    }

    /// Series of one job and attempt (all names, or those in `names`),
    /// each sampled for `n` pixels over `window` (see `lod.rs`).
    pub fn sampled(
        &self,
        store: &ViewStore,
        job: Uuid,
        attempt: u32,
        names: Option<&[&str]>,
        n: usize,
        window: Window,
    ) -> Result<BTreeMap<String, Sampled>, ViewsError> {
        let key = |name: &str| SeriesKey {
            job,
            attempt,
            name: name.to_string(),
        };
        let names: Vec<String> = match names {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => {
                let mut all = store.series_names(job, attempt)?;
                let lo = key("");
                all.extend(
                    self.live
                        .range(lo..)
                        .take_while(|(k, _)| k.job == job && k.attempt == attempt)
                        .map(|(k, _)| k.name.clone()),
                );
                all.retain(|n| !is_internal(n));
                all.sort();
                all.dedup();
                all
            }
        };
        let mut out = BTreeMap::new();
        for name in names {
            let tail = self.live.get(&key(&name));
            let mut blocks = vec![];
            let mut start = 0u64;
            let stored = store.summaries(job, attempt, &name)?;
            let upto = tail.map_or(stored.len(), |t| t.first_block as usize);
            for (index, summary) in stored.into_iter().enumerate().take(upto) {
                blocks.push(Block {
                    index: index as u32,
                    start,
                    summary,
                    points: None,
                });
                start += summary.count as u64;
            }
            for (k, chunk) in tail.iter().flat_map(|t| t.points.chunks(BLOCK).enumerate()) {
                let summary = BlockSummary::of(chunk).expect("chunks are not empty");
                blocks.push(Block {
                    index: tail.map_or(0, |t| t.first_block) + k as u32,
                    start,
                    summary,
                    points: Some(chunk),
                });
                start += chunk.len() as u64;
            }
            if blocks.is_empty() {
                continue;
            }
            let sampled = lod::sample(&blocks, n, window, |index| {
                store.block(job, attempt, &name, index)
            })?;
            out.insert(name, sampled);
        }
        Ok(out)
    }

    /// Write what changed into `batch`; then keep in memory only the partial
    /// last blocks of series whose job is still `live`.
    pub fn checkpoint(
        &mut self,
        store: &ViewStore,
        batch: &mut sled::Batch,
        live: impl Fn(Uuid) -> bool,
    ) -> Result<(), ViewsError> {
        for (key, tail) in self.live.iter_mut().filter(|(_, t)| t.dirty) {
            // The summary page the tail starts in keeps its earlier records.
            let mut page = tail.first_block / PAGE;
            let kept = (tail.first_block % PAGE) as usize * RECORD;
            let mut records = match kept {
                0 => Vec::new(),
                _ => match store.summary_page(key.job, key.attempt, &key.name, page)? {
                    Some(mut r) if r.len() >= kept => {
                        r.truncate(kept);
                        r
                    }
                    _ => {
                        return Err(ViewsError::Corrupt {
                            key: format!(
                                "t: summaries of series {:?} of job {}",
                                key.name, key.job
                            ),
                            reason: format!("page {page} lacks blocks before {}", tail.first_block),
                        })
                    }
                },
            };
            for (i, chunk) in tail.points.chunks(BLOCK).enumerate() {
                let index = tail.first_block + i as u32;
                ViewStore::put_block(batch, key.job, key.attempt, &key.name, index, chunk);
                if index / PAGE != page {
                    let full = std::mem::take(&mut records);
                    ViewStore::put_summary_page(batch, key.job, key.attempt, &key.name, page, full);
                    page = index / PAGE;
                }
                BlockSummary::of(chunk)
                    .expect("chunks are not empty")
                    .encode(&mut records);
            }
            if !records.is_empty() {
                ViewStore::put_summary_page(batch, key.job, key.attempt, &key.name, page, records);
            }
            tail.dirty = false;
            let full = tail.points.len() / BLOCK;
            tail.points.drain(..full * BLOCK);
            tail.first_block += full as u32;
        }
        self.live.retain(|k, t| live(k.job) && !t.points.is_empty());
        Ok(())
    }

    /// Series tails held in memory (for tests and the scale benchmark).
    pub fn resident_points(&self) -> usize {
        self.live.values().map(|t| t.points.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::lod::tests::{reference, same, value};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Points logged in bursts, checkpointed now and then (so series
        /// cross stored blocks, summary pages and the tail in memory), over
        /// two attempts: each attempt samples as its own points alone do,
        /// live and after the job ended and left memory.
        #[test]
        fn a_stored_series_samples_as_its_points_do(
            first in prop::collection::vec(value(), 1..3000),
            second in prop::collection::vec(value(), 1..900),
            bursts in prop::collection::vec(1usize..700, 1..6),
            every in 1usize..4,
            n in 1usize..200,
            from in prop::option::of(0u64..2000),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = ViewStore::open(dir.path()).unwrap();
            let job = Uuid::from_u128(7);
            let mut index = MetricIndex::default();
            let mut logged: [Vec<(u64, f64)>; 2] = [vec![], vec![]];
            let mut k = 0;
            for (attempt, values) in [(1u32, &first), (2, &second)] {
                let series = &mut logged[attempt as usize - 1];
                while series.len() < values.len() {
                    let take = bursts[k % bursts.len()].min(values.len() - series.len());
                    let burst: Vec<(u64, f64)> =
                        (series.len()..series.len() + take).map(|i| (i as u64 / 2, values[i])).collect();
                    index
                        .add(&store, job, attempt, false, burst.iter().map(|&(s, v)| ("loss", s, v)))
                        .unwrap();
                    series.extend(burst);
                    k += 1;
                    if k % every == 0 {
                        let mut batch = sled::Batch::default();
                        index.checkpoint(&store, &mut batch, |_| true).unwrap();
                        store.apply(batch).unwrap();
                    }
                }
            }
            let window = Window { from, to: from.map(|f| f + 700) };
            let check = |index: &MetricIndex| -> Result<(), TestCaseError> {
                for attempt in [1u32, 2] {
                    let want = reference(&logged[attempt as usize - 1], n, window);
                    let got = index.sampled(&store, job, attempt, None, n, window).unwrap();
                    let got = got.get("loss").cloned().unwrap_or_default();
                    prop_assert!(same(&got, &want), "attempt {attempt}: {got:?} vs {want:?}");
                    let whole = index.series(&store, job, attempt, None).unwrap();
                    prop_assert_eq!(whole["loss"].len(), logged[attempt as usize - 1].len());
                }
                Ok(())
            };
            check(&index)?;
            // The job ends: everything written, nothing left in memory.
            let mut batch = sled::Batch::default();
            index.checkpoint(&store, &mut batch, |_| false).unwrap();
            store.apply(batch).unwrap();
            prop_assert_eq!(index.resident_points(), 0);
            check(&index)?;
            check(&MetricIndex::default())?;
        }
    }
}
