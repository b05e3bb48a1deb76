//! Fused CPU kernels with their own backward passes, for the two hot spots
//! of a training step: the attention softmax (scale, additive mask, softmax)
//! and the log-probability of target tokens over the vocabulary.
//!
//! candle runs elementwise ops on one thread and materializes every
//! intermediate; these kernels make one parallel pass forward and one
//! backward. They are used for f32 on the CPU only; other devices and dtypes
//! take the plain differentiable path in `ops`. Both are checked against
//! that path (values and gradients) in the tests.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    match s {
        CpuStorage::U32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("{what}: expected u32"),
    }
}

/// Shape of x [B, H, T, K] after checking that `table` is [B, 1, T, K]
/// (a per-batch table broadcast over heads: attention bias, RoPE cos/sin).
fn dims_with_table(x: &Layout, table: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    let (b, h, t, k) = x.shape().dims4()?;
    if table.shape().dims() != [b, 1, t, k] {
        candle_core::bail!("{what} {:?} do not match {:?}", table.shape(), x.shape());
    }
    Ok((b, h, t, k))
}

/// An output buffer for a kernel that writes every element before anything
/// reads it: the zero-fill `vec![0.0; n]` would cost a full pass (memset was
/// ~5% of an SFT step). The same pattern as candle's `alloc_uninit`.
pub(crate) fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and no destructor, and every
    // caller overwrites all `n` elements before the vector is read.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// Which CPU kernels this process takes: gemm's AVX-512 ones where the CPU
/// has AVX-512F, our AVX2+FMA kernels where it has those, scalar otherwise.
/// Different paths round differently, so it is part of a job's fingerprint.
pub fn kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if avx2_fma() {
            return "avx2+fma";
        }
        "x86_64-scalar"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "scalar"
    }
}

/// Whether this CPU has AVX2 and FMA, which the hand-vectorized kernels
/// below need (std caches the detection).
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Below this many elements a kernel runs on the calling thread: waking the
/// pool costs more than the work (decoding one token touches a few thousand).
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Apply `f(row_index, row)` to each `width`-long row of `out`, in parallel
/// when the work is large enough. Rows are independent, so the result does
/// not depend on the choice.
fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() < PARALLEL_MIN_ELEMS {
        out.chunks_mut(width).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(r, o)| f(r, o));
    }
}

/// softmax(scale * scores + bias) over the last dim.
/// scores: [B, H, T, K]; bias: [B, 1, T, K] (broadcast over H).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "herd-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "scores")?;
        let bias = f32_slice(s2, l2, "bias")?;
        let (_, h, t, k) = dims_with_table(l1, l2, "bias")?;
        let mut out = output_buffer(x.len());
        for_rows(&mut out, k, |row, o| {
            let (bi, ti) = (row / (h * t), row % t);
            let xr = &x[row * k..(row + 1) * k];
            let br = &bias[(bi * t + ti) * k..(bi * t + ti + 1) * k];
            // Masked entries sit ~1e9 below the max, where the polynomial
            // exp is exactly 0; a row with nothing unmasked (padding) has all
            // entries near its max and stays finite.
            let max = fast_exp::scale_add_max(xr, self.scale, br, o);
            let sum = fast_exp::exp_shifted_inplace(o, max);
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(g), None))
    }
}

/// d scores = scale * p * (g - sum(g * p)), row by row.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "herd-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = f32_slice(s1, l1, "probs")?;
        let g = f32_slice(s2, l2, "grad")?;
        let k = *l1.shape().dims().last().unwrap_or(&1);
        let mut out = output_buffer(p.len());
        for_rows(&mut out, k, |row, o| {
            let (pr, gr) = (&p[row * k..(row + 1) * k], &g[row * k..(row + 1) * k]);
            let dot = dot(pr, gr);
            for j in 0..k {
                o[j] = self.scale * pr[j] * (gr[j] - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whether the fused kernels apply to this tensor.
pub fn usable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// softmax(scale * scores + bias): scores [B, H, T, K], bias [B, 1, T, K].
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(
        &bias.contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
        },
    )
}

/// log p(target) per row: logits [M, V], targets [M] u32 -> [M].
struct TargetLogprob;

impl CustomOp2 for TargetLogprob {
    fn name(&self) -> &'static str {
        "herd-target-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "logits")?;
        let ids = u32_slice(s2, l2, "targets")?;
        let (m, v) = l1.shape().dims2()?;
        if ids.len() != m || ids.iter().any(|i| *i as usize >= v) {
            candle_core::bail!("targets must be {m} ids below {v}");
        }
        let out: Vec<f32> = (0..m)
            .into_par_iter()
            .map(|r| {
                let row = &x[r * v..(r + 1) * v];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = fast_exp::exp_shifted(row, max, None);
                row[ids[r] as usize] - max - sum.ln()
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.contiguous()?.apply_op3_no_bwd(
            targets,
            &grad.contiguous()?,
            &TargetLogprobBwd,
        )?;
        Ok((Some(g), None))
    }
}

/// d logits[r] = g[r] * (onehot(target[r]) - softmax(logits[r])).
struct TargetLogprobBwd;

impl CustomOp3 for TargetLogprobBwd {
    fn name(&self) -> &'static str {
        "herd-target-logprob-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "logits")?;
        let ids = u32_slice(s2, l2, "targets")?;
        let g = f32_slice(s3, l3, "grad")?;
        let (_, v) = l1.shape().dims2()?;
        let mut out = output_buffer(x.len());
        for_rows(&mut out, v, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = fast_exp::exp_shifted(row, max, Some(o));
            let scale = -g[r] / sum;
            o.iter_mut().for_each(|a| *a *= scale);
            o[ids[r] as usize] += g[r];
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// log p(target) per row: logits [M, V] f32, targets [M] u32 -> [M].
pub fn target_logprob(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TargetLogprob)
}

/// Rows per partial sum in reductions over rows: fixed, so results do not
/// depend on the thread count.
const ROWS_PER_CHUNK: usize = 64;

/// RMSNorm: x [N, H] (any leading dims), w [H] -> x / sqrt(mean(x^2) + eps) * w.
struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// sum a[j] * b[j], in 16 independent partial sums so that it vectorizes
/// (a single running sum must be added in order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "herd-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "weight")?;
        let h = w.len();
        let mut out = output_buffer(x.len());
        for_rows(&mut out, h, |r, o| {
            let row = &x[r * h..(r + 1) * h];
            let inv = inv_rms(row, self.eps);
            for j in 0..h {
                o[j] = row[j] * inv * w[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBwdX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(
            &g,
            &RmsNormBwdW {
                eps: self.eps,
                h: w.elem_count(),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx = inv * (w*g - xhat * mean(w*g*xhat)), xhat = x * inv.
struct RmsNormBwdX {
    eps: f32,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "herd-rms-norm-bwd-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "weight")?;
        let g = f32_slice(s3, l3, "grad")?;
        let h = w.len();
        let mut out = output_buffer(x.len());
        for_rows(&mut out, h, |r, o| {
            let (row, gr) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
            let inv = inv_rms(row, self.eps);
            // o holds w * g first (no per-row allocation), then dx.
            for j in 0..h {
                o[j] = w[j] * gr[j];
            }
            let dot = dot(o, row) * inv / h as f32;
            for j in 0..h {
                o[j] = inv * (o[j] - row[j] * inv * dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// dw = sum over rows of g * xhat (partial sums over fixed row chunks).
struct RmsNormBwdW {
    eps: f32,
    h: usize,
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "herd-rms-norm-bwd-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let g = f32_slice(s2, l2, "grad")?;
        let h = self.h;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(h * ROWS_PER_CHUNK)
            .zip(g.par_chunks(h * ROWS_PER_CHUNK))
            .map(|(xc, gc)| {
                let mut acc = vec![0f32; h];
                for (row, gr) in xc.chunks(h).zip(gc.chunks(h)) {
                    let inv = inv_rms(row, self.eps);
                    for j in 0..h {
                        acc[j] += gr[j] * row[j] * inv;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; h];
        for p in partials {
            for j in 0..h {
                out[j] += p[j];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(h)))
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// RoPE, Hugging Face halves layout: x [B, H, T, D], cos/sin [B, 1, T, D].
/// y = x * cos + rot(x) * sin with rot([a, b]) = [-b, a].
struct Rope {
    transpose: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "herd-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let cos = f32_slice(s2, l2, "cos")?;
        let sin = f32_slice(s3, l3, "sin")?;
        let (_, h, t, d) = dims_with_table(l1, l2, "rope tables")?;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        for_rows(&mut out, d, |r, o| {
            let (bi, ti) = (r / (h * t), r % t);
            let xr = &x[r * d..(r + 1) * d];
            let base = (bi * t + ti) * d;
            let (c, s) = (&cos[base..base + d], &sin[base..base + d]);
            for j in 0..half {
                // forward: o1 = x1 c1 - x2 s1 ; o2 = x2 c2 + x1 s2
                // backward: d1 = g1 c1 + g2 s2 ; d2 = g2 c2 - g1 s1
                if self.transpose {
                    o[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
                    o[j + half] = xr[j + half] * c[j + half] - xr[j] * s[j];
                } else {
                    o[j] = xr[j] * c[j] - xr[j + half] * s[j];
                    o[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &Rope { transpose: true })?;
        Ok((Some(dx), None, None))
    }
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { transpose: false },
    )
}

/// Most rows for which [`linear_few_rows`] beats gemm: decoding a batch of
/// a few sequences multiplies a handful of rows by every weight matrix, and
/// gemm then spends its time packing the weights and waking threads.
pub const FEW_ROWS: usize = 8;

/// Below this many weights the few-row kernel stays on the calling thread.
const FEW_ROWS_PARALLEL_MIN_WEIGHTS: usize = 1 << 21;

/// y = x @ w^T for x [M, K] with M <= FEW_ROWS and w [N, K] row-major: each
/// output is one dot product of two contiguous rows, so the weights are read
/// once, in order, with no packing. Rows of w are split across threads; each
/// output is computed by one thread in a fixed order, so the result does not
/// depend on the thread count.
struct LinearFewRows;

/// `out[r] = x[r] . w_row` for the m rows of x; `simd` is [`avx2_fma`],
/// asked once per product rather than once per weight row.
fn dot_rows(simd: bool, x: &[f32], m: usize, k: usize, w_row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd {
            // SAFETY: `simd` says the CPU supports AVX2 and FMA, which is all
            // `dot_rows_avx2` requires; it reads only within the slices.
            unsafe { dot_rows_avx2(x, m, k, w_row, out) };
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    for (r, o) in out.iter_mut().enumerate().take(m) {
        let xr = &x[r * k..(r + 1) * k];
        let mut acc = [0f32; 8];
        let mut chunks_x = xr.chunks_exact(8);
        let mut chunks_w = w_row.chunks_exact(8);
        for (a, b) in (&mut chunks_x).zip(&mut chunks_w) {
            for i in 0..8 {
                acc[i] += a[i] * b[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in chunks_x.remainder().iter().zip(chunks_w.remainder()) {
            s += a * b;
        }
        *o = s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(x: &[f32], m: usize, k: usize, w_row: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k8 = k / 8 * 8;
    let wp = w_row.as_ptr();
    // Four rows of x per pass: each 8-wide chunk of w is loaded once.
    let mut r0 = 0;
    while r0 < m {
        let rows = (m - r0).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j < k8 {
            let wv = _mm256_loadu_ps(wp.add(j));
            for (i, a) in acc.iter_mut().enumerate().take(rows) {
                let xv = _mm256_loadu_ps(x.as_ptr().add((r0 + i) * k + j));
                *a = _mm256_fmadd_ps(xv, wv, *a);
            }
            j += 8;
        }
        for (i, a) in acc.iter().enumerate().take(rows) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
            let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let xr = &x[(r0 + i) * k..(r0 + i + 1) * k];
            for jj in k8..k {
                s += xr[jj] * w_row[jj];
            }
            out[r0 + i] = s;
        }
        r0 += 4;
    }
}

impl CustomOp2 for LinearFewRows {
    fn name(&self) -> &'static str {
        "herd-linear-few-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "weight")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || m > FEW_ROWS {
            candle_core::bail!("linear_few_rows: x {:?} w {:?}", l1.shape(), l2.shape());
        }
        // Computed transposed ([N, M]: one weight row -> M outputs), then
        // transposed back, so each task writes a contiguous slice.
        let mut out_t = output_buffer(n * m);
        let simd = avx2_fma();
        let body = |(i, o): (usize, &mut [f32])| dot_rows(simd, x, m, k, &w[i * k..(i + 1) * k], o);
        if n * k >= FEW_ROWS_PARALLEL_MIN_WEIGHTS {
            out_t.par_chunks_mut(m).enumerate().for_each(body);
        } else {
            out_t.chunks_mut(m).enumerate().for_each(body);
        }
        let mut out = output_buffer(m * n);
        for (i, row) in out_t.chunks(m).enumerate() {
            for (r, v) in row.iter().enumerate() {
                out[r * n + i] = *v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dx = g @ w, dw = g^T @ x.
        Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
    }
}

/// x [M, K] @ w[N, K]^T for M <= [`FEW_ROWS`], f32 on the CPU.
pub fn linear_few_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearFewRows)
}

/// SwiGLU's gate: silu(g) * u, elementwise, with its own backward
/// (candle's `silu` and `mul` make four passes forward and seven backward).
struct Swiglu;

/// s[j] = sigmoid(g[j]), with the vectorized exp.
fn sigmoid_row(g: &[f32], s: &mut [f32]) {
    for (o, x) in s.iter_mut().zip(g) {
        *o = -x;
    }
    fast_exp::exp_shifted_inplace(s, 0.0);
    s.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "herd-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gate")?;
        let u = f32_slice(s2, l2, "up")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", l1.shape(), l2.shape());
        }
        let width = *l1.shape().dims().last().unwrap_or(&1);
        let mut out = output_buffer(g.len());
        for_rows(&mut out, width, |r, o| {
            let (gr, ur) = (
                &g[r * width..(r + 1) * width],
                &u[r * width..(r + 1) * width],
            );
            sigmoid_row(gr, o);
            for j in 0..width {
                o[j] *= gr[j] * ur[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwigluBwd)?; // [2, ..]
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// d gate = grad * u * s(g) * (1 + g * (1 - s(g))); d up = grad * silu(g),
/// in one pass (one sigmoid per element), stacked: [2, ..shape].
struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "herd-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gate")?;
        let u = f32_slice(s2, l2, "up")?;
        let d = f32_slice(s3, l3, "grad")?;
        let n = g.len();
        let width = *l1.shape().dims().last().unwrap_or(&1);
        let mut out = output_buffer(2 * n);
        let (dg, du) = out.split_at_mut(n);
        let body = |((r, og), ou): ((usize, &mut [f32]), &mut [f32])| {
            let span = r * width..(r + 1) * width;
            let (gr, ur, dr) = (&g[span.clone()], &u[span.clone()], &d[span]);
            sigmoid_row(gr, ou);
            for j in 0..width {
                let s = ou[j];
                og[j] = dr[j] * ur[j] * s * (1.0 + gr[j] * (1.0 - s));
                ou[j] = dr[j] * gr[j] * s;
            }
        };
        if n < PARALLEL_MIN_ELEMS {
            dg.chunks_mut(width)
                .enumerate()
                .zip(du.chunks_mut(width))
                .for_each(body);
        } else {
            dg.par_chunks_mut(width)
                .enumerate()
                .zip(du.par_chunks_mut(width))
                .for_each(body);
        }
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// silu(gate) * up, elementwise (SwiGLU), f32 on the CPU.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// exp for the softmax kernels: Cephes' single-precision polynomial (within
/// 2 ulp of `f32::exp` on its range), 8 lanes at a time with AVX2+FMA. The
/// same polynomial serves the tail and CPUs without AVX2, so a row's values
/// do not depend on where it starts. Below -87.3 (where `f32::exp`
/// underflows to subnormals) it returns 0, as masked logits need.
mod fast_exp {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    const LOW: f32 = -87.33;
    const HIGH: f32 = 88.37;

    pub(super) fn exp(x: f32) -> f32 {
        if x < LOW {
            return 0.0;
        }
        // Fused multiply-adds as in the vector code, so lanes and tail agree.
        let x = x.min(HIGH);
        let n = (x * LOG2E).round_ties_even();
        let r = (-n).mul_add(LN2_HI, x);
        let r = (-n).mul_add(LN2_LO, r);
        let mut p = P[0];
        for c in &P[1..] {
            p = p.mul_add(r, *c);
        }
        let y = (p * r).mul_add(r, r) + 1.0;
        y * f32::from_bits((((n as i32) + 127) as u32) << 23)
    }

    /// o[j] = scale * x[j] + b[j]; returns max(o). Vectorized because the
    /// max reduction is not (NaN rules keep the compiler from it).
    pub(super) fn scale_add_max(x: &[f32], scale: f32, b: &[f32], o: &mut [f32]) -> f32 {
        assert!(
            x.len() == b.len() && x.len() == o.len(),
            "scale_add_max: lengths"
        );
        #[cfg(target_arch = "x86_64")]
        {
            if super::avx2_fma() {
                // SAFETY: AVX2 and FMA are present; all three slices have
                // the same length (asserted above).
                return unsafe { scale_add_max_avx2(x, scale, b, o) };
            }
        }
        let mut max = f32::NEG_INFINITY;
        for j in 0..x.len() {
            o[j] = scale.mul_add(x[j], b[j]);
            max = max.max(o[j]);
        }
        max
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scale_add_max_avx2(x: &[f32], scale: f32, b: &[f32], o: &mut [f32]) -> f32 {
        use std::arch::x86_64::*;
        let n8 = x.len() / 8 * 8;
        let sv = _mm256_set1_ps(scale);
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j < n8 {
            let v = _mm256_fmadd_ps(
                sv,
                _mm256_loadu_ps(x.as_ptr().add(j)),
                _mm256_loadu_ps(b.as_ptr().add(j)),
            );
            _mm256_storeu_ps(o.as_mut_ptr().add(j), v);
            mv = _mm256_max_ps(mv, v);
            j += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for k in n8..x.len() {
            o[k] = scale.mul_add(x[k], b[k]);
            max = max.max(o[k]);
        }
        max
    }

    /// v[j] = exp(v[j] - shift); returns the sum.
    pub(super) fn exp_shifted_inplace(v: &mut [f32], shift: f32) -> f32 {
        let len = v.len();
        let p = v.as_mut_ptr();
        // SAFETY: reads and writes `len` floats at `p`, which `v` owns; each
        // element is read before it is written, so aliasing is harmless.
        unsafe { exp_shifted_raw(p, p, len, shift) }
    }

    /// dst[j] = exp(src[j] - shift) (or only the sum when `dst` is None);
    /// returns the sum.
    pub(super) fn exp_shifted(src: &[f32], shift: f32, dst: Option<&mut [f32]>) -> f32 {
        let dst = match dst {
            Some(d) => {
                assert_eq!(d.len(), src.len(), "exp_shifted: length mismatch");
                d.as_mut_ptr()
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: `src` has `src.len()` floats, `dst` is null or as long.
        unsafe { exp_shifted_raw(src.as_ptr(), dst, src.len(), shift) }
    }

    /// # Safety
    /// `src` is valid for `len` reads; `dst` is null or valid for `len`
    /// writes (it may equal `src`).
    unsafe fn exp_shifted_raw(src: *const f32, dst: *mut f32, len: usize, shift: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if super::avx2_fma() {
                // SAFETY: AVX2 and FMA are present (checked above); the
                // pointer contract is the caller's.
                return unsafe { exp_shifted_avx2(src, dst, len, shift) };
            }
        }
        let mut sum = 0f32;
        for j in 0..len {
            // SAFETY: j < len, per the contract.
            let e = exp(unsafe { *src.add(j) } - shift);
            if !dst.is_null() {
                unsafe { *dst.add(j) = e };
            }
            sum += e;
        }
        sum
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_shifted_avx2(src: *const f32, dst: *mut f32, len: usize, shift: f32) -> f32 {
        use std::arch::x86_64::*;
        let n8 = len / 8 * 8;
        let shift_v = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut j = 0;
        while j < n8 {
            let x = _mm256_sub_ps(_mm256_loadu_ps(src.add(j)), shift_v);
            let under = _mm256_cmp_ps(x, _mm256_set1_ps(LOW), _CMP_LT_OQ);
            let x = _mm256_min_ps(x, _mm256_set1_ps(HIGH));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(P[0]);
            for c in &P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
                _mm256_set1_ps(1.0),
            );
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            ));
            let e = _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2));
            if !dst.is_null() {
                _mm256_storeu_ps(dst.add(j), e);
            }
            acc = _mm256_add_ps(acc, e);
            j += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for k in n8..len {
            let e = exp(*src.add(k) - shift);
            if !dst.is_null() {
                *dst.add(k) = e;
            }
            sum += e;
        }
        sum
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn matches_std_exp() {
            let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0441).collect();
            let mut out = vec![0f32; xs.len()];
            let sum = super::exp_shifted(&xs, 0.0, Some(&mut out));
            let mut want_sum = 0f64;
            for (x, e) in xs.iter().zip(&out) {
                let want = (*x as f64).exp();
                want_sum += if *x < super::LOW { 0.0 } else { want };
                if *x >= super::LOW {
                    assert!(
                        ((*e as f64) - want).abs() <= 3e-7 * want,
                        "exp({x}) = {e}, want {want}"
                    );
                    assert_eq!(*e, super::exp(*x), "lanes and tail agree at {x}");
                } else {
                    assert_eq!(*e, 0.0);
                }
            }
            assert!(sum.is_infinite() && want_sum > f32::MAX as f64);
            // As softmax uses it: shifted by the max, the sum is accurate.
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = super::exp_shifted(&xs, max, None);
            let want: f64 = xs.iter().map(|x| ((*x - max) as f64).exp()).sum();
            assert!(((sum as f64) - want).abs() < 1e-6 * want, "{sum} vs {want}");
            assert_eq!(super::exp(-1e9), 0.0);
        }
    }
}
