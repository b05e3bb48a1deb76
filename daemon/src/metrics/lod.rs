//! Level of detail: a series sampled down to what a chart of N pixels can
//! show, without hiding anything a person would look for.
//!
//! The points of the window (`from ≤ step ≤ to`) are cut into buckets of
//! `size` consecutive points, counted from the series' first point, where
//! `size` is the power of two at or above `span / N` (`span`: from the
//! window's first point to its last, which is its count unless steps go
//! back). The answer holds the
//! window's first and last points and each bucket's lowest and highest
//! values and first NaN, in series order: at most about 2N points, and the
//! whole window when it has N points or fewer. So no spike and no NaN is
//! ever sampled away.
//!
//! Sizes of at least 512 points cover whole blocks, so a block inside the
//! window contributes its stored summary (`summary.rs`) and its points are
//! never read: a 10M-point series at N = 2,000 is 20k summaries. Only the
//! blocks a window's edge cuts, or a bucket smaller than a block, are read.
//! The answer depends on the series and N alone, never on how its points
//! fall into blocks.

use std::borrow::Cow;

use super::summary::{BlockSummary, Point};

/// Steps `from..=to`; either end open.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

impl Window {
    pub fn holds(&self, step: u64) -> bool {
        self.from.is_none_or(|f| step >= f) && self.to.is_none_or(|t| step <= t)
    }
    fn misses(&self, min_step: u64, max_step: u64) -> bool {
        self.from.is_some_and(|f| max_step < f) || self.to.is_some_and(|t| min_step > t)
    }
}

/// One block of a series as the sampler sees it: where it starts in the
/// series, its summary, and its points when they are in memory.
pub struct Block<'a> {
    pub index: u32,
    pub start: u64,
    pub summary: BlockSummary,
    pub points: Option<&'a [(u64, f64)]>,
}

/// A sampled series: the points to draw, and how many the window holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampled {
    pub points: Vec<(u64, f64)>,
    pub count: u64,
}

/// A point and where it is in the series.
type At = (u64, u64, f64);

#[derive(Default)]
struct Bucket {
    min: Option<At>,
    max: Option<At>,
    nan: Option<At>,
}

impl Bucket {
    /// Points must come in series order: strict comparisons keep the
    /// first occurrence of a repeated extreme.
    fn add(&mut self, p: At) {
        if p.2.is_nan() {
            self.nan.get_or_insert(p);
            return;
        }
        if self.min.is_none_or(|m| p.2 < m.2) {
            self.min = Some(p);
        }
        if self.max.is_none_or(|m| p.2 > m.2) {
            self.max = Some(p);
        }
    }
}

enum Part<'b, 'a> {
    /// A block wholly inside the window.
    Whole(&'b Block<'a>),
    /// The window's points of a block its edge cuts.
    Cut(Vec<At>),
}

impl Part<'_, '_> {
    /// Where in the series the part's first and last points are.
    fn first_at(&self) -> u64 {
        match self {
            Part::Whole(b) => b.start,
            Part::Cut(kept) => kept[0].0,
        }
    }
    fn last_at(&self) -> u64 {
        match self {
            Part::Whole(b) => b.start + b.summary.count as u64 - 1,
            Part::Cut(kept) => kept[kept.len() - 1].0,
        }
    }
}

/// Sample `blocks` (a series, in order) for `n` pixels; `load` reads a
/// block's points that are not in memory.
pub fn sample<'a, E>(
    blocks: &[Block<'a>],
    n: usize,
    window: Window,
    mut load: impl FnMut(u32) -> Result<Vec<(u64, f64)>, E>,
) -> Result<Sampled, E> {
    let mut points_of = |b: &Block<'a>| -> Result<Cow<'a, [(u64, f64)]>, E> {
        match b.points {
            Some(p) => Ok(Cow::Borrowed(p)),
            None => load(b.index).map(Cow::Owned),
        }
    };
    let mut parts = vec![];
    let mut count = 0u64;
    for b in blocks {
        let s = &b.summary;
        if window.misses(s.min_step, s.max_step) {
            continue;
        }
        if window.holds(s.min_step) && window.holds(s.max_step) {
            count += s.count as u64;
            parts.push(Part::Whole(b));
            continue;
        }
        let kept: Vec<At> = (b.start..)
            .zip(points_of(b)?.iter())
            .filter(|(_, p)| window.holds(p.0))
            .map(|(i, &(step, value))| (i, step, value))
            .collect();
        count += kept.len() as u64;
        if !kept.is_empty() {
            parts.push(Part::Cut(kept));
        }
    }
    let mut out: Vec<At> = vec![];
    if count <= n as u64 {
        for part in parts {
            match part {
                Part::Whole(b) => out.extend(
                    (b.start..)
                        .zip(points_of(b)?.iter())
                        .map(|(i, &(s, v))| (i, s, v)),
                ),
                Part::Cut(kept) => out.extend(kept),
            }
        }
        return Ok(Sampled {
            points: out.into_iter().map(|(_, s, v)| (s, v)).collect(),
            count,
        });
    }

    // From the span, not the count: steps that go back (a resumed run)
    // scatter a window's points, and N buckets must still cover them.
    let span = match (parts.first(), parts.last()) {
        (Some(a), Some(b)) => b.last_at() - a.first_at() + 1,
        _ => 0,
    };
    let size = span.div_ceil(n.max(1) as u64).next_power_of_two();
    // Buckets in series order: (bucket number, bucket).
    let mut buckets: Vec<(u64, Bucket)> = vec![];
    fn bucket(buckets: &mut Vec<(u64, Bucket)>, number: u64) -> &mut Bucket {
        if buckets.last().is_none_or(|(k, _)| *k != number) {
            buckets.push((number, Bucket::default()));
        }
        &mut buckets.last_mut().expect("just pushed").1
    }
    let (mut first, mut last): (Option<At>, Option<At>) = (None, None);
    for part in &parts {
        match part {
            Part::Whole(b) if b.start / size == (b.start + b.summary.count as u64 - 1) / size => {
                let s = &b.summary;
                let at = |p: Point| (b.start + p.offset as u64, p.step, p.value);
                first.get_or_insert(at(s.first));
                last = Some(at(s.last));
                let into = bucket(&mut buckets, b.start / size);
                for p in [s.min, s.max, s.nan].into_iter().flatten() {
                    into.add(at(p));
                }
            }
            Part::Whole(b) => {
                for (i, &(step, value)) in (b.start..).zip(points_of(b)?.iter()) {
                    first.get_or_insert((i, step, value));
                    last = Some((i, step, value));
                    bucket(&mut buckets, i / size).add((i, step, value));
                }
            }
            Part::Cut(kept) => {
                for &p in kept {
                    first.get_or_insert(p);
                    last = Some(p);
                    bucket(&mut buckets, p.0 / size).add(p);
                }
            }
        }
    }
    out.extend(first);
    out.extend(last);
    for (_, b) in buckets {
        out.extend([b.min, b.max, b.nan].into_iter().flatten());
    }
    out.sort_by_key(|p| p.0);
    out.dedup_by_key(|p| p.0);
    Ok(Sampled {
        points: out.into_iter().map(|(_, s, v)| (s, v)).collect(),
        count,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, point by point, with no blocks at all.
    pub(crate) fn reference(series: &[(u64, f64)], n: usize, window: Window) -> Sampled {
        let kept: Vec<(usize, (u64, f64))> = series
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, p)| window.holds(p.0))
            .collect();
        let count = kept.len() as u64;
        if kept.len() <= n {
            let points = kept.into_iter().map(|(_, p)| p).collect();
            return Sampled { points, count };
        }
        let span = kept[kept.len() - 1].0 - kept[0].0 + 1;
        let size = span.div_ceil(n).next_power_of_two();
        let mut chosen = std::collections::BTreeSet::new();
        chosen.insert(kept[0].0);
        chosen.insert(kept[kept.len() - 1].0);
        let mut by_bucket: std::collections::BTreeMap<usize, Vec<(usize, f64)>> =
            Default::default();
        for &(i, (_, v)) in &kept {
            by_bucket.entry(i / size).or_default().push((i, v));
        }
        for members in by_bucket.values() {
            let finite: Vec<&(usize, f64)> = members.iter().filter(|m| !m.1.is_nan()).collect();
            if let Some(lo) = finite
                .iter()
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            {
                // total_cmp orders -0.0 below 0.0; the sampler treats them
                // as equal and keeps the first.
                let v = lo.1;
                chosen.insert(finite.iter().find(|m| m.1 == v).unwrap().0);
            }
            if let Some(hi) = finite
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            {
                let v = hi.1;
                chosen.insert(finite.iter().find(|m| m.1 == v).unwrap().0);
            }
            if let Some(nan) = members.iter().find(|m| m.1.is_nan()) {
                chosen.insert(nan.0);
            }
        }
        let points = chosen.into_iter().map(|i| series[i]).collect();
        Sampled { points, count }
    }

    /// `series` cut into blocks of the given sizes; every `in_memory`-th
    /// block's points are held, the others loaded.
    fn run(series: &[(u64, f64)], cuts: &[usize], n: usize, window: Window) -> Sampled {
        let mut blocks = vec![];
        let (mut start, mut k) = (0usize, 0);
        while start < series.len() {
            let len = cuts[k % cuts.len()].min(series.len() - start);
            let points = &series[start..start + len];
            blocks.push(Block {
                index: k as u32,
                start: start as u64,
                summary: BlockSummary::of(points).unwrap(),
                points: (k % 3 == 0).then_some(points),
            });
            start += len;
            k += 1;
        }
        sample(&blocks, n, window, |i| {
            let b = &blocks[i as usize];
            Ok::<_, ()>(series[b.start as usize..][..b.summary.count as usize].to_vec())
        })
        .unwrap()
    }

    pub(crate) fn same(a: &Sampled, b: &Sampled) -> bool {
        a.count == b.count
            && a.points.len() == b.points.len()
            && a.points
                .iter()
                .zip(&b.points)
                .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
    }

    pub(crate) fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            20 => -1e3f64..1e3,
            2 => (-3i32..3).prop_map(|v| v as f64),
            1 => Just(f64::NAN),
            1 => Just(f64::INFINITY),
            1 => Just(f64::NEG_INFINITY),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn the_sample_is_the_definition_whatever_the_blocks(
            values in prop::collection::vec(value(), 0..3000),
            cuts in prop::collection::vec(1usize..700, 1..5),
            n in 1usize..300,
            from in prop::option::of(0u64..3000),
            width in prop::option::of(0u64..3000),
            jumbled in any::<bool>(),
        ) {
            // Steps mostly in order; sometimes repeated or going back (a
            // resumed run logs steps again).
            let series: Vec<(u64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, &v)| (if jumbled { (i as u64 * 7) % 1000 } else { i as u64 }, v))
                .collect();
            let window = Window { from, to: from.zip(width).map(|(f, w)| f + w).or(width) };
            let want = reference(&series, n, window);
            let got = run(&series, &cuts, n, window);
            prop_assert!(same(&got, &want), "n {n}, {window:?}: got {:?}, want {:?}", got, want);
            // The same answer from whole 512-point blocks.
            let whole = run(&series, &[512], n, window);
            prop_assert!(same(&whole, &want));
            // And what the sampling promises, stated directly.
            let kept: Vec<(u64, f64)> = series.iter().copied().filter(|p| window.holds(p.0)).collect();
            if kept.len() <= n {
                let all = Sampled { points: kept.clone(), count: kept.len() as u64 };
                prop_assert!(same(&got, &all), "a short window is whole");
            } else {
                prop_assert!(got.points.len() <= 3 * n + 5, "{} points for n {n}", got.points.len());
                prop_assert_eq!(got.points.first().map(|p| p.0), kept.first().map(|p| p.0));
                prop_assert_eq!(got.points.last().map(|p| p.0), kept.last().map(|p| p.0));
                let finite = kept.iter().map(|p| p.1).filter(|v| !v.is_nan());
                if let Some(lo) = finite.clone().reduce(f64::min) {
                    prop_assert!(got.points.iter().any(|p| p.1 == lo), "global min {lo}");
                }
                if let Some(hi) = finite.reduce(f64::max) {
                    prop_assert!(got.points.iter().any(|p| p.1 == hi), "global max {hi}");
                }
                if kept.iter().any(|p| p.1.is_nan()) {
                    prop_assert!(got.points.iter().any(|p| p.1.is_nan()), "a NaN is marked");
                }
            }
        }
    }

    #[test]
    fn blocks_inside_the_window_are_never_read_when_buckets_cover_them() {
        let series: Vec<(u64, f64)> = (0..512 * 64)
            .map(|i| (i as u64, (i % 977) as f64))
            .collect();
        let blocks: Vec<Block> = series
            .chunks(512)
            .enumerate()
            .map(|(k, c)| Block {
                index: k as u32,
                start: k as u64 * 512,
                summary: BlockSummary::of(c).unwrap(),
                points: None,
            })
            .collect();
        let mut loaded = vec![];
        let got = sample(&blocks, 16, Window::default(), |i| {
            loaded.push(i);
            Ok::<_, ()>(series[i as usize * 512..][..512].to_vec())
        })
        .unwrap();
        assert!(loaded.is_empty(), "read blocks {loaded:?}");
        assert_eq!(got, reference(&series, 16, Window::default()));
        // A window cutting blocks 3 and 9 reads those two only.
        let window = Window {
            from: Some(3 * 512 + 100),
            to: Some(9 * 512 + 7),
        };
        let got = sample(&blocks, 4, window, |i| {
            loaded.push(i);
            Ok::<_, ()>(series[i as usize * 512..][..512].to_vec())
        })
        .unwrap();
        assert_eq!(loaded, vec![3, 9]);
        assert_eq!(got, reference(&series, 4, window));
    }
}
