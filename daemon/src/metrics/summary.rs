//! Block summaries: what a stored block of up to 512 points adds up to (its
//! count, step range, sum, first and last points, lowest and highest values
//! and first NaN), kept beside the block so that a 10M-point series can be
//! drawn from 20k summaries instead of 10M points (see `lod.rs`).
//!
//! Summaries are stored in pages of `PAGE` blocks, one fixed-size record per
//! block, so a long series is a few hundred reads, and a checkpoint rewrites
//! only the page its live tail is in.

/// Blocks per stored summary page: 65,536 points. Tests use pages of two
/// blocks, so that a series of a few thousand points crosses pages.
pub const PAGE: u32 = if cfg!(test) { 2 } else { 128 };

/// One point of a block: its offset in the block, step and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub offset: u32,
    pub step: u64,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSummary {
    pub count: u32,
    pub min_step: u64,
    pub max_step: u64,
    /// Of the finite values.
    pub sum: f64,
    pub first: Point,
    pub last: Point,
    /// The lowest and highest values that are not NaN, first occurrence.
    pub min: Option<Point>,
    pub max: Option<Point>,
    /// The first NaN: NaN has no place in an order, so it is kept apart.
    pub nan: Option<Point>,
}

/// Bytes per stored summary: count, two steps, sum, then five point slots.
pub const RECORD: usize = 4 + 8 + 8 + 8 + 5 * SLOT;
const SLOT: usize = 4 + 8 + 8;
const ABSENT: u32 = u32::MAX;

impl BlockSummary {
    /// The summary of a block's points; `None` for no points.
    pub fn of(points: &[(u64, f64)]) -> Option<BlockSummary> {
        let (&(step0, value0), &(step_n, value_n)) = (points.first()?, points.last()?);
        let at = |offset: usize, (step, value): (u64, f64)| Point {
            offset: offset as u32,
            step,
            value,
        };
        let mut s = BlockSummary {
            count: points.len() as u32,
            min_step: step0,
            max_step: step0,
            sum: 0.0,
            first: at(0, (step0, value0)),
            last: at(points.len() - 1, (step_n, value_n)),
            min: None,
            max: None,
            nan: None,
        };
        for (i, &(step, value)) in points.iter().enumerate() {
            s.min_step = s.min_step.min(step);
            s.max_step = s.max_step.max(step);
            if value.is_nan() {
                s.nan.get_or_insert(at(i, (step, value)));
                continue;
            }
            if value.is_finite() {
                s.sum += value;
            }
            // Strict comparisons keep the first occurrence.
            if s.min.is_none_or(|m| value < m.value) {
                s.min = Some(at(i, (step, value)));
            }
            if s.max.is_none_or(|m| value > m.value) {
                s.max = Some(at(i, (step, value)));
            }
        }
        Some(s)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.min_step.to_le_bytes());
        out.extend_from_slice(&self.max_step.to_le_bytes());
        out.extend_from_slice(&self.sum.to_le_bytes());
        for p in [
            Some(self.first),
            Some(self.last),
            self.min,
            self.max,
            self.nan,
        ] {
            let p = p.unwrap_or(Point {
                offset: ABSENT,
                step: 0,
                value: 0.0,
            });
            out.extend_from_slice(&p.offset.to_le_bytes());
            out.extend_from_slice(&p.step.to_le_bytes());
            out.extend_from_slice(&p.value.to_le_bytes());
        }
    }

    /// Decode one record; `None` when it is not one this code wrote (a
    /// short record, an offset past the count, a missing first point).
    pub fn decode(b: &[u8]) -> Option<BlockSummary> {
        if b.len() != RECORD {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let count = u32_at(0);
        let slot = |k: usize| -> Result<Option<Point>, ()> {
            let i = 28 + k * SLOT;
            match u32_at(i) {
                ABSENT => Ok(None),
                offset if offset < count => Ok(Some(Point {
                    offset,
                    step: u64_at(i + 4),
                    value: f64::from_bits(u64_at(i + 12)),
                })),
                _ => Err(()),
            }
        };
        Some(BlockSummary {
            count,
            min_step: u64_at(4),
            max_step: u64_at(12),
            sum: f64::from_bits(u64_at(20)),
            first: slot(0).ok()??,
            last: slot(1).ok()??,
            min: slot(2).ok()?,
            max: slot(3).ok()?,
            nan: slot(4).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_keeps_first_extremes_and_sets_nan_apart() {
        let points = [
            (1, 3.0),
            (2, f64::NAN),
            (3, -1.0),
            (4, 7.0),
            (5, -1.0),
            (6, 7.0),
            (7, f64::NAN),
            (8, 2.0),
        ];
        let s = BlockSummary::of(&points).unwrap();
        assert_eq!(s.count, 8);
        assert_eq!((s.min_step, s.max_step), (1, 8));
        assert_eq!(s.min.unwrap().offset, 2, "the first -1.0");
        assert_eq!(s.max.unwrap().offset, 3, "the first 7.0");
        assert_eq!(s.nan.unwrap().offset, 1);
        assert_eq!(s.sum, 3.0 - 1.0 + 7.0 - 1.0 + 7.0 + 2.0);
        assert_eq!((s.first.step, s.last.step), (1, 8));
        let mut b = vec![];
        s.encode(&mut b);
        assert_eq!(b.len(), RECORD);
        let back = BlockSummary::decode(&b).unwrap();
        assert_eq!(back.min, s.min);
        assert!(back.nan.unwrap().value.is_nan());
        assert_eq!(BlockSummary::decode(&b[1..]), None);
        assert_eq!(BlockSummary::of(&[]), None);
    }

    #[test]
    fn infinities_are_extremes_and_a_block_of_nan_has_none() {
        let s = BlockSummary::of(&[(1, f64::INFINITY), (2, 0.0), (3, f64::NEG_INFINITY)]).unwrap();
        assert_eq!(s.max.unwrap().value, f64::INFINITY);
        assert_eq!(s.min.unwrap().value, f64::NEG_INFINITY);
        assert_eq!(s.sum, 0.0, "the sum is of finite values");
        let s = BlockSummary::of(&[(1, f64::NAN)]).unwrap();
        assert_eq!((s.min, s.max), (None, None));
    }
}
