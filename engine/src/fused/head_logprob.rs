//! log p(target) straight from hidden states through a frozen LM head: the
//! [M, V] logits are computed a chunk of rows at a time and never kept, and
//! backward computes each chunk's logits again. The largest activation of a
//! step (M × a 49k–128k vocabulary of floats) is then not held from forward
//! to backward. For LoRA and any frozen base: the head takes no gradient
//! (a trained head goes through `logprob` over whole logits instead).

use super::*;

/// Rows of logits computed at once (a few tens of MB at a 50k vocabulary).
const CHUNK: usize = 256;

/// rows [M, H] f32, targets [M] u32 -> [M]; the head [V, H] f32 is held by
/// the op (frozen: no gradient).
struct HeadLogprob {
    head: Tensor,
}

impl HeadLogprob {
    /// Logits of rows `start..start + n` of `x` ([M, H]).
    fn logits(&self, x: &Tensor, start: usize, n: usize) -> Result<Tensor> {
        x.narrow(0, start, n)?.matmul(&self.head.t()?)
    }
}

impl CustomOp2 for HeadLogprob {
    fn name(&self) -> &'static str {
        "herd-head-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rows")?;
        let ids = u32_slice(s2, l2, "targets")?;
        let (m, h) = l1.shape().dims2()?;
        let (v, h2) = self.head.dims2()?;
        if h != h2 || ids.len() != m || ids.iter().any(|i| *i as usize >= v) {
            candle_core::bail!(
                "head_logprob: rows {m}x{h}, head {v}x{h2}, {} targets below {v}",
                ids.len()
            );
        }
        let x = Tensor::from_slice(x, (m, h), &candle_core::Device::Cpu)?;
        let mut out = Vec::with_capacity(m);
        for start in (0..m).step_by(CHUNK) {
            let n = CHUNK.min(m - start);
            let lg = self.logits(&x, start, n)?.flatten_all()?.to_vec1::<f32>()?;
            let part: Vec<f32> = (0..n)
                .into_par_iter()
                .map(|r| {
                    let row = &lg[r * v..(r + 1) * v];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = fast_exp::exp_shifted(row, max, None);
                    row[ids[start + r] as usize] - max - sum.ln()
                })
                .collect();
            out.extend(part);
        }
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }

    fn bwd(
        &self,
        rows: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = rows.contiguous()?;
        let m = rows.dim(0)?;
        let mut parts = Vec::with_capacity(m.div_ceil(CHUNK));
        for start in (0..m).step_by(CHUNK) {
            let n = CHUNK.min(m - start);
            let lg = self.logits(&rows, start, n)?;
            // d logits = g (onehot - softmax), then through the head.
            let d = super::logprob::target_logprob_grad(
                &lg,
                &targets.narrow(0, start, n)?.contiguous()?,
                &grad.narrow(0, start, n)?.contiguous()?,
            )?;
            parts.push(d.matmul(&self.head)?);
        }
        Ok((Some(Tensor::cat(&parts, 0)?), None))
    }
}

/// log p(target) per row through a frozen head: rows [M, H] f32, head
/// [V, H] f32, targets [M] u32 -> [M]; the gradient flows to `rows` only.
pub fn head_logprob(rows: &Tensor, head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    rows.contiguous()?.apply_op2(
        &targets.contiguous()?,
        HeadLogprob {
            head: head.detach().contiguous()?,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Across chunk boundaries: the same values and row gradients as whole
    /// logits through `target_logprob`.
    #[test]
    fn equals_whole_logits_with_its_gradient() {
        let dev = Device::Cpu;
        let (m, h, v) = (CHUNK + 37, 24, 301);
        let rows = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, h), &dev).unwrap()).unwrap();
        let head = Tensor::randn(0f32, 0.3, (v, h), &dev).unwrap();
        let ids: Vec<u32> = (0..m as u32).map(|i| (i * 7919) % v as u32).collect();
        let ids = Tensor::new(ids.as_slice(), &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, m, &dev).unwrap();
        let fused = head_logprob(rows.as_tensor(), &head, &ids).unwrap();
        let plain = super::super::target_logprob(
            &rows.as_tensor().matmul(&head.t().unwrap()).unwrap(),
            &ids,
        )
        .unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (fused.to_vec1().unwrap(), plain.to_vec1().unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
        let ga = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (ga, gb): (Vec<f32>, Vec<f32>) = (
            ga.get(rows.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            gb.get(rows.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
        );
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "grad {x} vs {y}");
        }
    }
}
