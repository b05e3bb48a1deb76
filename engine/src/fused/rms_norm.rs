//! RMSNorm forward and both backward passes (input and weight).

use super::*;

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
