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
    /// Positions filled (after the prefix, when there is one).
    pub len: usize,
    /// Keys and values every row starts with, shared rather than copied
    /// (see [`KvCache::branch`]).
    pub prefix: Option<Prefix>,
}

/// Prompts' keys and values that several decoded rows continue: per layer
/// (k, v) [N, nkv, P, hd], and which prompt each row continues. Decoding
/// reads a prompt's keys once for all its rows instead of from a copy per
/// row (a group of 8 completions of a 128-token prompt read 8 copies).
pub struct Prefix {
    pub layers: Vec<(Tensor, Tensor)>,
    /// owner[row]: the prompt (index into dim 0) row `row` continues.
    pub owner: Vec<u32>,
}

impl KvCache {
    /// A cache that holds at most `capacity` positions, written in place
    /// (inference only: no gradient flows through an in-place write).
    pub fn with_capacity(capacity: usize) -> Self {
        KvCache {
            layers: vec![],
            capacity,
            len: 0,
            prefix: None,
        }
    }

    /// Rows that continue this (filled, prefix-free) cache's prompts: row
    /// `r` continues prompt `owner[r]`, with room for `capacity` more
    /// positions of its own, written in place. Where the fused decode kernel
    /// reads the cache (f32 on the CPU), the prompts' keys and values become
    /// the shared [`Prefix`]; elsewhere each row gets its own copy, once.
    pub fn branch(self, owner: Vec<u32>, capacity: usize) -> candle_core::Result<KvCache> {
        if self.prefix.is_some() {
            candle_core::bail!("KV cache: a branched cache cannot branch again");
        }
        let len = self.len;
        let layers = self
            .layers
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.ok_or_else(|| {
                    candle_core::Error::Msg("KV cache: a layer was not filled".into())
                })?;
                Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let n = layers.len();
        if layers.iter().all(|(k, _)| crate::fused::usable(k)) {
            return Ok(KvCache {
                layers: (0..n).map(|_| None).collect(),
                capacity,
                len: 0,
                prefix: Some(Prefix { layers, owner }),
            });
        }
        let mut rows = KvCache::with_capacity(len + capacity);
        rows.layers = (0..n).map(|_| None).collect();
        let Some((k0, _)) = layers.first() else {
            return Ok(rows);
        };
        let idx = Tensor::new(owner.as_slice(), k0.device())?;
        for (l, (k, v)) in layers.iter().enumerate() {
            rows.append(l, k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)?;
        }
        rows.len = len;
        Ok(rows)
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
}
