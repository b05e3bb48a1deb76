//! Attention for decoding: each row's new position(s) against its cached
//! keys and values, read in place from the cache's buffers: its prompt's,
//! shared by every row that continues the prompt, then its own.
//!
//! Decoding multiplies [rep, hd] queries by [Tk, hd] keys for every row and
//! KV head: products so small that gemm spent more time packing and
//! dispatching them than multiplying (~20% of a sampling step). Here each
//! (row, KV head) is one task: scores, masked softmax and the weighted sum
//! of values in one pass. Inference only: only the KV cache's in-place mode
//! (generation) calls it, and a backward pass through it fails loudly
//! (candle's "backward not supported") rather than dropping gradients.

use super::*;

/// q [B, nkv, R, hd] (R = rep·t: query heads of a KV group × new positions,
/// head-major, as the model lays them out) against a row's keys and values:
/// its prompt's shared prefix [N, nkv, P, hd] (row b continues prompt
/// owner[b]), then its own k, v [B, nkv, Tk - P, hd] (strided views of the
/// cache: the last dim contiguous), with the additive bias [B, 1, t, Tk];
/// returns [B, nkv, R, hd].
struct DecodeAttention {
    /// bias[b][q][j], copied out of its tensor.
    bias: Vec<f32>,
    t: usize,
    scale: f32,
    /// The shared prefix's keys, values and owners.
    prefix: Option<(Tensor, Tensor, Vec<u32>)>,
}

/// Element `index` of a strided 4-d layout.
fn offset(l: &Layout, index: [usize; 4]) -> usize {
    l.start_offset()
        + index
            .iter()
            .zip(l.stride())
            .map(|(i, s)| i * s)
            .sum::<usize>()
}

/// a · b in 8 partial sums (vectorizes; head dims are multiples of 8).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

fn f32_storage<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

/// One (row, KV head): R query rows against Tk keys and values, in two
/// segments (the shared prefix's, then the row's own), each [n, hd].
struct Block<'a> {
    q: &'a [f32],
    k: [&'a [f32]; 2],
    v: [&'a [f32]; 2],
    /// [t, Tk]: query row qi takes position qi % t.
    bias: &'a [f32],
    t: usize,
    hd: usize,
    scale: f32,
}

fn attend(b: &Block, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if b.hd.is_multiple_of(8) && super::avx2_fma() {
            // SAFETY: AVX2 and FMA are present; `attend_avx2` checks the
            // slice lengths it indexes unchecked.
            return unsafe { attend_avx2(b, o) };
        }
    }
    attend_scalar(b, o)
}

/// Scores, masked softmax (as the training softmax computes it: masked
/// entries are exactly 0 after the polynomial exp), in place over
/// `probs` [R, Tk].
fn softmax_rows(b: &Block, probs: &mut [f32], tk: usize) {
    let mut scaled = vec![0f32; tk];
    for (qi, row) in probs.chunks_exact_mut(tk).enumerate() {
        let pos = qi % b.t; // head-major: query head qi / t, position qi % t
        let bias = &b.bias[pos * tk..][..tk];
        let max = fast_exp::scale_add_max(row, b.scale, bias, &mut scaled);
        let total = fast_exp::exp_shifted_inplace(&mut scaled, max);
        let inv = 1.0 / total;
        for (p, e) in row.iter_mut().zip(&scaled) {
            *p = e * inv;
        }
    }
}

impl Block<'_> {
    fn keys(&self) -> usize {
        (self.k[0].len() + self.k[1].len()) / self.hd
    }
}

fn attend_scalar(b: &Block, o: &mut [f32]) {
    let (hd, tk) = (b.hd, b.keys());
    let r = b.q.len() / hd;
    // probs[qi][j]: each key row is read once for all query rows.
    let mut probs = vec![0f32; r * tk];
    for (j, kr) in b.k[0]
        .chunks_exact(hd)
        .chain(b.k[1].chunks_exact(hd))
        .enumerate()
    {
        for (qi, qr) in b.q.chunks_exact(hd).enumerate() {
            probs[qi * tk + j] = dot8(qr, kr);
        }
    }
    softmax_rows(b, &mut probs, tk);
    o.fill(0.0);
    for (j, vr) in b.v[0]
        .chunks_exact(hd)
        .chain(b.v[1].chunks_exact(hd))
        .enumerate()
    {
        for (qi, or) in o.chunks_exact_mut(hd).enumerate() {
            let p = probs[qi * tk + j];
            if p != 0.0 {
                for (x, y) in or.iter_mut().zip(vr) {
                    *x += p * y;
                }
            }
        }
    }
}

/// The same with AVX2+FMA, hd a multiple of 8. Scores are taken 8 keys at
/// a time (8 dot products summed across lanes together); each segment's
/// last keys are padded with zero keys, so every score is summed the same
/// way whatever the segment lengths. Values are summed into registers, 32
/// lanes at a time, in key order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(b: &Block, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let hd = b.hd;
    let tk = b.keys();
    let r = b.q.len() / hd;
    assert!(
        hd.is_multiple_of(8)
            && b.k
                .iter()
                .zip(&b.v)
                .all(|(k, v)| k.len() == v.len() && k.len() % hd == 0)
            && o.len() == r * hd,
        "decode_attention: block shapes"
    );
    let mut probs = vec![0f32; r * tk];
    let mut sums = [0f32; 8];
    let mut tail = vec![0f32; 8 * hd];
    let mut first = 0; // the segment's first key
    for keys in b.k {
        let n = keys.len() / hd;
        let full = n / 8 * 8;
        // The segment's last partial group of keys, zero-padded to 8.
        tail.fill(0.0);
        tail[..(n - full) * hd].copy_from_slice(&keys[full * hd..]);
        for qi in 0..r {
            let q = b.q.as_ptr().add(qi * hd);
            let mut j = 0;
            while j < n {
                let group = if j < full {
                    keys.as_ptr().add(j * hd)
                } else {
                    tail.as_ptr()
                };
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < hd {
                    let qv = _mm256_loadu_ps(q.add(c));
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(group.add(u * hd + c)), *a);
                    }
                    c += 8;
                }
                // Eight lane sums at once: pairwise adds, then the halves.
                let s01 = _mm256_hadd_ps(acc[0], acc[1]);
                let s23 = _mm256_hadd_ps(acc[2], acc[3]);
                let s45 = _mm256_hadd_ps(acc[4], acc[5]);
                let s67 = _mm256_hadd_ps(acc[6], acc[7]);
                let s0123 = _mm256_hadd_ps(s01, s23);
                let s4567 = _mm256_hadd_ps(s45, s67);
                let lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
                let hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
                _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_add_ps(lo, hi));
                let m = (n - j).min(8);
                probs[qi * tk + first + j..][..m].copy_from_slice(&sums[..m]);
                j += 8;
            }
        }
        first += n;
    }
    softmax_rows(b, &mut probs, tk);
    for qi in 0..r {
        let row = &probs[qi * tk..][..tk];
        let mut c = 0;
        while c < hd {
            let lanes = ((hd - c) / 8).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            for values in b.v {
                for vr in values.chunks_exact(hd) {
                    let p = row[j];
                    j += 1;
                    if p == 0.0 {
                        continue;
                    }
                    let pv = _mm256_set1_ps(p);
                    let v = vr.as_ptr().add(c);
                    for (u, a) in acc[..lanes].iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v.add(u * 8)), *a);
                    }
                }
            }
            for (u, a) in acc[..lanes].iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(qi * hd + c + u * 8), *a);
            }
            c += lanes * 8;
        }
    }
}

/// The shared prefix's storage for one call: keys and values [N, nkv, P,
/// hd] (strided), and the prompt each row continues.
struct SharedPrefix<'a> {
    k: &'a [f32],
    k_layout: &'a Layout,
    v: &'a [f32],
    v_layout: &'a Layout,
    owner: &'a [u32],
    len: usize,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "herd-decode-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, nkv, r, hd) = lq.shape().dims4()?;
        let (b2, nkv2, tk, hd2) = lk.shape().dims4()?;
        if (b, nkv, hd) != (b2, nkv2, hd2) || lv.shape() != lk.shape() {
            candle_core::bail!(
                "decode_attention: q {:?} k {:?} v {:?}",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        if lk.stride()[3] != 1 || lv.stride()[3] != 1 || !lq.is_contiguous() {
            candle_core::bail!("decode_attention: keys and values need a contiguous last dim");
        }
        let t = self.t;
        let (q, k, v) = (
            f32_slice(sq, lq, "q")?,
            f32_storage(sk, "k")?,
            f32_storage(sv, "v")?,
        );
        if lk.stride()[2] != hd || lv.stride()[2] != hd {
            candle_core::bail!("decode_attention: keys and values need contiguous positions");
        }
        // The shared prefix: its storage held for the call.
        let guards = self
            .prefix
            .as_ref()
            .map(|(pk, pv, _)| [pk, pv].map(|x| x.storage_and_layout()));
        let mut shared: Option<SharedPrefix> = None;
        if let (Some([(gk, pkl), (gv, pvl)]), Some((_, _, owner))) = (&guards, &self.prefix) {
            let (candle_core::Storage::Cpu(ck), candle_core::Storage::Cpu(cv)) = (&**gk, &**gv)
            else {
                candle_core::bail!("decode_attention: the prefix is not on the CPU");
            };
            let (n, nkv2, p, hd2) = pkl.shape().dims4()?;
            if (nkv2, hd2) != (nkv, hd)
                || pvl.shape() != pkl.shape()
                || owner.len() != b
                || owner.iter().any(|o| *o as usize >= n)
                || [pkl, pvl]
                    .iter()
                    .any(|l| l.stride()[3] != 1 || l.stride()[2] != hd)
            {
                candle_core::bail!(
                    "decode_attention: prefix {:?} for {b} rows of {nkv}×{hd}",
                    pkl.shape()
                );
            }
            shared = Some(SharedPrefix {
                k: f32_storage(ck, "prefix k")?,
                k_layout: pkl,
                v: f32_storage(cv, "prefix v")?,
                v_layout: pvl,
                owner,
                len: p,
            });
        }
        let p = shared.as_ref().map_or(0, |s| s.len);
        let all = p + tk;
        if r % t != 0 || self.bias.len() != b * t * all {
            candle_core::bail!("decode_attention: bias does not match {t} positions × {all} keys");
        }
        let mut out = output_buffer(b * nkv * r * hd);
        // One task per (row, KV head): its R query rows, in a fixed order.
        // Its keys and values are each one contiguous [Tk, hd] block per
        // segment; the rows of one prompt read the same prefix block.
        let task = |(bg, o): (usize, &mut [f32])| {
            let (bi, g) = (bg / nkv, bg % nkv);
            let (kp, vp): (&[f32], &[f32]) = match &shared {
                Some(sp) => {
                    let i = sp.owner[bi] as usize;
                    (
                        &sp.k[offset(sp.k_layout, [i, g, 0, 0])..][..sp.len * hd],
                        &sp.v[offset(sp.v_layout, [i, g, 0, 0])..][..sp.len * hd],
                    )
                }
                None => (&[], &[]),
            };
            let block = Block {
                q: &q[(bi * nkv + g) * r * hd..][..r * hd],
                k: [kp, &k[offset(lk, [bi, g, 0, 0])..][..tk * hd]],
                v: [vp, &v[offset(lv, [bi, g, 0, 0])..][..tk * hd]],
                bias: &self.bias[bi * t * all..][..t * all],
                t,
                hd,
                scale: self.scale,
            };
            attend(&block, o);
        };
        if b * nkv * r * all * hd < PARALLEL_MIN_ELEMS * 8 {
            out.chunks_mut(r * hd).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(r * hd).enumerate().for_each(task);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, nkv, r, hd))))
    }
}

/// Attention of `q` [B, nkv, R, hd] over each row's keys and values: the
/// `prefix` (keys, values [N, nkv, P, hd], and the prompt each row
/// continues) if there is one, then `k`, `v` [B, nkv, Tk - P, hd]; `bias`
/// [B, 1, t, Tk] (R = rep·t). f32 on the CPU, no backward.
pub fn decode_attention(
    q: &Tensor,
    prefix: Option<(&Tensor, &Tensor, &[u32])>,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (_, _, t, _) = bias.dims4()?;
    let op = DecodeAttention {
        bias: bias.flatten_all()?.to_vec1::<f32>()?,
        t,
        scale: scale as f32,
        prefix: prefix.map(|(k, v, owner)| (k.clone(), v.clone(), owner.to_vec())),
    };
    q.contiguous()?.apply_op3(k, v, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::MASKED;
    use crate::rng::Rng;

    /// Plain attention in f64: softmax(scale q·k + bias) v.
    fn reference(b: &Block) -> Vec<f64> {
        let (hd, tk) = (b.hd, b.keys());
        let r = b.q.len() / hd;
        let k = [b.k[0], b.k[1]].concat();
        let v = [b.v[0], b.v[1]].concat();
        let mut out = vec![0f64; r * hd];
        for qi in 0..r {
            let bias = &b.bias[(qi % b.t) * tk..][..tk];
            let s: Vec<f64> = (0..tk)
                .map(|j| {
                    let d: f64 = (0..hd)
                        .map(|c| b.q[qi * hd + c] as f64 * k[j * hd + c] as f64)
                        .sum();
                    d * b.scale as f64 + bias[j] as f64
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for j in 0..tk {
                for c in 0..hd {
                    out[qi * hd + c] += e[j] / total * v[j * hd + c] as f64;
                }
            }
        }
        out
    }

    /// Both paths agree with plain attention: head dims 32 and 72, key
    /// counts on and off multiples of 8, masked keys, two new positions, a
    /// shared prefix of several lengths; and splitting the keys into prefix
    /// and own changes no bit.
    #[test]
    fn matches_plain_attention() {
        let mut rng = Rng::new(5);
        for (hd, tk, split, t, r) in [
            (32, 1, 0, 1, 2),
            (32, 13, 5, 1, 2),
            (32, 64, 16, 2, 4),
            (32, 200, 131, 1, 2),
            (72, 37, 0, 1, 3),
            (72, 37, 36, 1, 3),
        ] {
            let mut gen = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
            let (q, k, v) = (gen(r * hd), gen(tk * hd), gen(tk * hd));
            let bias: Vec<f32> = (0..t * tk)
                .map(|i| {
                    if i % 5 == 3 && i % tk != 0 {
                        MASKED
                    } else {
                        0.0
                    }
                })
                .collect();
            let at = split * hd;
            let block = Block {
                q: &q,
                k: [&k[..at], &k[at..]],
                v: [&v[..at], &v[at..]],
                bias: &bias,
                t,
                hd,
                scale: 0.3,
            };
            let whole = Block {
                k: [&[], &k],
                v: [&[], &v],
                ..block
            };
            let mut unsplit = vec![0f32; r * hd];
            attend(&whole, &mut unsplit);
            let want = reference(&block);
            let mut scalar = vec![0f32; r * hd];
            attend_scalar(&block, &mut scalar);
            let mut fast = vec![0f32; r * hd];
            attend(&block, &mut fast);
            for (i, w) in want.iter().enumerate() {
                for (path, got) in [("scalar", scalar[i]), ("dispatched", fast[i])] {
                    assert!(
                        (got as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "{path} hd {hd} tk {tk}: {got} vs {w} at {i}"
                    );
                }
            }
            assert_eq!(fast, unsplit, "hd {hd} tk {tk} split {split}");
        }
    }
}
