//! SwiGLU (silu(gate) * up) and its backward in one pass.

use super::*;

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
