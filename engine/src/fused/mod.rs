//! Fused CPU kernels with their own backward passes, one file each: the
//! attention softmax (`softmax`), target-token log-probabilities (`logprob`),
//! RMSNorm (`rms_norm`), RoPE (`rope`), the few-row linear layer for decoding
//! (`linear`) and SwiGLU (`swiglu`), with the vectorized exp they share
//! (`fast_exp`), a linear layer over a frozen bf16 weight (`frozen_linear`),
//! target log-probabilities straight through a frozen LM head, logits
//! recomputed in backward rather than kept (`head_logprob`);
//! and one without a backward, for generation only: attention
//! over the KV cache in place (`decode_attention`). This file holds what they share: buffer and layout checks,
//! the kernel-path detection, row parallelism.
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

/// sum a[j] * b[j], in 16 independent partial sums so that it vectorizes
/// (a single running sum must be added in order).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Unnormalized sampling weights at a temperature: `out[j]` =
/// exp((logits[j] - max) / temperature), through the vectorized exp (the
/// sampler took a libm exp per vocabulary entry per row per token).
pub fn tempered_weights(logits: &[f32], temperature: f32, out: &mut [f32]) {
    assert_eq!(logits.len(), out.len(), "tempered_weights: lengths");
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / temperature;
    for (o, x) in out.iter_mut().zip(logits) {
        *o = (x - max) * inv;
    }
    fast_exp::exp_shifted_inplace(out, 0.0);
}

mod decode_attention;
mod fast_exp;
mod frozen_linear;
mod head_logprob;
mod linear;
mod logprob;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

pub use decode_attention::decode_attention;
pub use frozen_linear::frozen_linear;
pub use head_logprob::head_logprob;
pub use linear::{linear_few_rows, FEW_ROWS};
pub use logprob::{row_entropy, target_logprob};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::{masked_softmax, usable};
pub use swiglu::swiglu;
