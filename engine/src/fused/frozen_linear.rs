//! A linear layer over a frozen bf16 weight with f32 activations, on the
//! CPU: LoRA with `dtype=bf16` keeps the base in bf16 (half its memory)
//! while the CPU computes in f32. Casting the weight first would leave an
//! f32 copy of every weight in the graph until backward ends; this op keeps
//! only the bf16 weight and widens it inside forward and backward. The
//! weight is frozen: it gets no gradient.

use super::*;

struct FrozenLinear;

/// bf16 -> f32, in parallel chunks (elementwise: the same on any thread count).
fn widen(w: &[half::bf16]) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(1 << 16)
        .zip(w.par_chunks(1 << 16))
        .for_each(|(o, i)| {
            for (o, i) in o.iter_mut().zip(i) {
                *o = i.to_f32();
            }
        });
    out
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "herd-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || !l2.is_contiguous() {
            candle_core::bail!("frozen_linear: x {:?} w {:?}", l1.shape(), l2.shape());
        }
        let w = match s2 {
            CpuStorage::BF16(v) => &v[l2.start_offset()..l2.start_offset() + n * k],
            _ => candle_core::bail!("frozen_linear: expected a bf16 weight"),
        };
        let device = candle_core::Device::Cpu;
        let x = Tensor::from_slice(x, (m, k), &device)?;
        let w = Tensor::from_vec(widen(w), (n, k), &device)?;
        let y = x.matmul(&w.t()?)?;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            Shape::from((m, n)),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dx = g @ w (widened for this product only); the weight is frozen.
        let w = w.to_dtype(candle_core::DType::F32)?;
        Ok((Some(grad.matmul(&w)?), None))
    }
}

/// x [M, K] f32 @ w [N, K]^T with w a frozen bf16 weight, on the CPU.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.detach().contiguous()?, FrozenLinear)
}
