//! The key/value cache of incremental decoding (and of training's shared
//! prompts).

use super::*;

/// Per-layer cached keys and values for incremental decoding.
///
/// Two ways to grow: by concatenation (the default; what training's shared
/// prompts use, gradients flowing through), or, with a capacity, by writing
/// each step's keys and values in place into buffers sized once (decoding:
/// concatenating copied the whole cache every step, and the fresh pages
/// cost as much again).
#[derive(Default)]
pub struct KvCache {
    /// (k, v) per layer, each [B, nkv, Tc, hd]; with a capacity, the whole
    /// buffers [B, nkv, capacity, hd], of which `len` positions are filled.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// 0: grow by concatenation.
    pub capacity: usize,
    /// Positions filled.
    pub len: usize,
}

impl KvCache {
    /// A cache that holds at most `capacity` positions, written in place
    /// (inference only: no gradient flows through an in-place write).
    pub fn with_capacity(capacity: usize) -> Self {
        KvCache {
            layers: vec![],
            capacity,
            len: 0,
        }
    }

    /// Add layer `l`'s keys and values of `t` new positions ([B, nkv, t, hd]);
    /// returns all of that layer's keys and values so far.
    pub(super) fn append(
        &mut self,
        l: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if self.capacity == 0 {
            let (k, v) = match self.layers[l].take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            self.layers[l] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        }
        let (b, nkv, t, hd) = k.dims4()?;
        if self.len + t > self.capacity {
            candle_core::bail!(
                "KV cache of {} positions is full ({} filled, {t} more)",
                self.capacity,
                self.len
            );
        }
        if self.layers[l].is_none() {
            let buffer = || Tensor::zeros((b, nkv, self.capacity, hd), k.dtype(), k.device());
            self.layers[l] = Some((buffer()?, buffer()?));
        }
        let (kb, vb) = self.layers[l].as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            kb.narrow(2, 0, self.len + t)?,
            vb.narrow(2, 0, self.len + t)?,
        ))
    }

    /// Keep rows `idx` of the batch (in that order, repeats allowed): each
    /// prompt's keys and values copied to the rows that continue it.
    pub fn select_rows(&mut self, idx: &Tensor) -> candle_core::Result<()> {
        for layer in self.layers.iter_mut() {
            if let Some((k, v)) = layer.take() {
                *layer = Some((k.index_select(idx, 0)?, v.index_select(idx, 0)?));
            }
        }
        Ok(())
    }
}
