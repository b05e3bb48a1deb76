//! A linear layer for a few rows (decoding): dot products over contiguous
//! weight rows, AVX2+FMA when present, with its own backward.

use super::*;

/// Most rows for which [`linear_few_rows`] beats gemm: decoding a batch of
/// a few sequences multiplies a handful of rows by every weight matrix, and
/// gemm then spends its time packing the weights and waking threads.
pub const FEW_ROWS: usize = 16;

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
