//! Attention softmax: scale, additive mask and softmax in one parallel pass,
//! with its own backward.

use super::*;

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
