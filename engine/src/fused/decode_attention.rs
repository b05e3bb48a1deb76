//! Attention for decoding: each row's new position(s) against its cached
//! keys and values, read in place from the cache's buffers.
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
/// head-major, as the model lays them out) against k, v [B, nkv, Tk, hd]
/// (strided views of the cache: the last dim contiguous), with the additive
/// bias [B, 1, t, Tk]; returns [B, nkv, R, hd].
struct DecodeAttention {
    /// bias[b][q][j], copied out of its tensor.
    bias: Vec<f32>,
    t: usize,
    scale: f32,
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
        if r % t != 0 || self.bias.len() != b * t * tk {
            candle_core::bail!("decode_attention: bias does not match {t} positions × {tk} keys");
        }
        let (q, k, v) = (
            f32_slice(sq, lq, "q")?,
            f32_storage(sk, "k")?,
            f32_storage(sv, "v")?,
        );
        if lk.stride()[2] != hd || lv.stride()[2] != hd {
            candle_core::bail!("decode_attention: keys and values need contiguous positions");
        }
        let mut out = output_buffer(b * nkv * r * hd);
        // One task per (row, KV head): its R query rows, in a fixed order.
        // Its keys and values are each one contiguous [Tk, hd] block.
        let task = |(bg, o): (usize, &mut [f32])| {
            let (bi, g) = (bg / nkv, bg % nkv);
            let kb = &k[offset(lk, [bi, g, 0, 0])..][..tk * hd];
            let vb = &v[offset(lv, [bi, g, 0, 0])..][..tk * hd];
            let qb = &q[(bi * nkv + g) * r * hd..][..r * hd];
            // probs[qi][j]: each key row is read once for all query rows.
            let mut probs = vec![0f32; r * tk];
            for (j, kr) in kb.chunks_exact(hd).enumerate() {
                for (qi, qr) in qb.chunks_exact(hd).enumerate() {
                    probs[qi * tk + j] = dot8(qr, kr);
                }
            }
            let mut scaled = vec![0f32; tk];
            for (qi, row) in probs.chunks_exact_mut(tk).enumerate() {
                let pos = qi % t; // head-major: query head qi / t, position qi % t
                let bias = &self.bias[(bi * t + pos) * tk..][..tk];
                // As the training softmax computes it (masked entries are
                // exactly 0 after the polynomial exp).
                let max = fast_exp::scale_add_max(row, self.scale, bias, &mut scaled);
                let total = fast_exp::exp_shifted_inplace(&mut scaled, max);
                let inv = 1.0 / total;
                for (p, e) in row.iter_mut().zip(&scaled) {
                    *p = e * inv;
                }
            }
            o.fill(0.0);
            for (j, vr) in vb.chunks_exact(hd).enumerate() {
                for (qi, or) in o.chunks_exact_mut(hd).enumerate() {
                    let p = probs[qi * tk + j];
                    if p != 0.0 {
                        for (x, y) in or.iter_mut().zip(vr) {
                            *x += p * y;
                        }
                    }
                }
            }
        };
        if b * nkv * r * tk * hd < PARALLEL_MIN_ELEMS * 8 {
            out.chunks_mut(r * hd).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(r * hd).enumerate().for_each(task);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, nkv, r, hd))))
    }
}

/// Attention of `q` [B, nkv, R, hd] over `k`, `v` [B, nkv, Tk, hd] with
/// `bias` [B, 1, t, Tk] (R = rep·t), f32 on the CPU, no backward.
pub fn decode_attention(
    q: &Tensor,
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
    };
    q.contiguous()?.apply_op3(k, v, op)
}
