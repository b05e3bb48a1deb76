//! Rotary position embedding; its backward is the same rotation, reversed.

use super::*;

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
