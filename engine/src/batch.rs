//! Rows, packing and attention masks.
//!
//! A row is a list of tokens, each with a RoPE position and a segment id. A
//! token sees an earlier token of its own segment, or of segment 0 (a shared
//! prefix). That one rule covers:
//! * plain causal rows (everything segment 0);
//! * several responses packed after one prompt (prompt 0, responses 1..k,
//!   positions continuing from the prompt for each response): RM rows, and
//!   DPO chosen+rejected sharing their prompt;
//! * several documents packed in one row (segments 1..n, positions restarting).
//!
//! Padding gets its own segment and sees only itself, so no attention row is
//! ever empty (an all-masked row would be NaN).

use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};
use crate::ops::MASKED;

const PAD_SEGMENT: u32 = u32::MAX;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

impl Row {
    /// A plain causal row.
    pub fn causal(ids: &[u32]) -> Row {
        Row {
            ids: ids.to_vec(),
            positions: (0..ids.len() as u32).collect(),
            segments: vec![0; ids.len()],
        }
    }

    /// Append a branch that continues the shared prefix (segment 0, the first
    /// `prefix_len` tokens). Returns the row index of the branch's first token.
    pub fn push_branch(&mut self, ids: &[u32], segment: u32, prefix_len: usize) -> usize {
        assert!(
            segment != 0 && segment != PAD_SEGMENT,
            "branch segments are 1..u32::MAX"
        );
        let start = self.ids.len();
        self.ids.extend_from_slice(ids);
        self.positions
            .extend((0..ids.len()).map(|i| (prefix_len + i) as u32));
        self.segments
            .extend(std::iter::repeat_n(segment, ids.len()));
        start
    }

    /// Append an independent document (positions restart at 0).
    pub fn push_document(&mut self, ids: &[u32], segment: u32) -> usize {
        assert!(
            segment != 0 && segment != PAD_SEGMENT,
            "document segments are 1..u32::MAX"
        );
        let start = self.ids.len();
        self.ids.extend_from_slice(ids);
        self.positions.extend(0..ids.len() as u32);
        self.segments
            .extend(std::iter::repeat_n(segment, ids.len()));
        start
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Rows padded to one length, as tensors.
pub struct Batch {
    pub ids: Tensor,       // [B, T] u32
    pub positions: Tensor, // [B, T] u32
    pub bias: Tensor,      // [B, 1, T, T] f32
    pub rows: usize,
    pub len: usize,
}

impl Batch {
    pub fn collate(rows: &[Row], pad_id: u32, device: &Device) -> Result<Batch> {
        if rows.is_empty() {
            return Err(EngineError::Input("empty batch".into()));
        }
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(EngineError::Input("batch of empty rows".into()));
        }
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut bias = vec![MASKED; b * t * t];
        for (ri, r) in rows.iter().enumerate() {
            let n = r.len();
            ids.extend_from_slice(&r.ids);
            ids.extend(std::iter::repeat_n(pad_id, t - n));
            pos.extend_from_slice(&r.positions);
            pos.extend(std::iter::repeat_n(0, t - n));
            let seg = |i: usize| if i < n { r.segments[i] } else { PAD_SEGMENT };
            for q in 0..t {
                let sq = seg(q);
                let base = (ri * t + q) * t;
                for k in 0..=q {
                    let sk = seg(k);
                    if sk == sq || (sk == 0 && sq != PAD_SEGMENT) {
                        bias[base + k] = 0.0;
                    }
                }
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            bias: Tensor::from_vec(bias, (b, 1, t, t), device)?,
            rows: b,
            len: t,
        })
    }
}

/// Additive causal bias [B, 1, T, T].
pub fn causal_bias(b: usize, t: usize, device: &Device) -> Result<Tensor> {
    let one: Vec<f32> = (0..t * t)
        .map(|i| if i % t <= i / t { 0.0 } else { MASKED })
        .collect();
    Ok(Tensor::from_vec(one, (1, 1, t, t), device)?.repeat((b, 1, 1, 1))?)
}
