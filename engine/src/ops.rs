//! Differentiable building blocks.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope*` have no
//! backward pass: gradients silently stop there. Everything here is written
//! with plain tensor ops that candle knows how to differentiate, and every
//! gradient is checked against PyTorch fixtures and finite differences.

use candle_core::{DType, Result, Tensor, D};

/// Large finite negative for masked attention logits: -inf would turn a fully
/// masked row into NaN.
pub const MASKED: f32 = -1e9;

/// RMSNorm over the last dim, computed in at least f32: x / sqrt(mean(x^2) + eps) * w.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::usable(x) && crate::fused::usable(weight) {
        return crate::fused::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let x = if dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// Softmax over the last dim. The max is detached: softmax does not depend
/// on the shift, so no gradient is lost and the backward pass is cheaper.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dim (shift detached, as above).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Rotary embedding, Hugging Face layout (halves, not interleaved).
/// x: [B, H, T, D]; cos, sin: [B, 1, T, D] (already duplicated to D).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if crate::fused::usable(x) && crate::fused::usable(cos) && x.dim(0)? == cos.dim(0)? {
        return crate::fused::rope(x, cos, sin);
    }
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// log sigmoid, stable for large |x|: min(x, 0) - log(1 + exp(-|x|)).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let neg_abs = x.abs()?.neg()?;
    x.minimum(&zeros)? - (neg_abs.exp()? + 1.0)?.log()?
}
