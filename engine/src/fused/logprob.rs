//! Log-probability of each target token over the vocabulary, without
//! materializing the log-softmax, with its own backward.

use super::*;

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
        Ok((Some(target_logprob_grad(logits, targets, grad)?), None))
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

/// d logits = g (onehot(target) - softmax(logits)), rows in parallel.
pub(super) fn target_logprob_grad(
    logits: &Tensor,
    targets: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op3_no_bwd(targets, &grad.contiguous()?, &TargetLogprobBwd)
}

/// log p(target) per row: logits [M, V] f32, targets [M] u32 -> [M].
pub fn target_logprob(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TargetLogprob)
}

/// Entropy of softmax(logits[r]) per row, no gradient: logits [M, V] f32
/// -> [M]. With e = exp(x - max) and S = Σe: H = ln S + max - Σ e·x / S,
/// one pass of the vectorized exp per row (the log-softmax and its exp as
/// tensor ops were two passes and two [M, V] buffers).
struct RowEntropy;

impl candle_core::CustomOp1 for RowEntropy {
    fn name(&self) -> &'static str {
        "herd-row-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "logits")?;
        let (m, v) = l.shape().dims2()?;
        let out: Vec<f32> = (0..m)
            .into_par_iter()
            .map_init(
                || vec![0f32; v],
                |e, r| {
                    let row = &x[r * v..(r + 1) * v];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let total = fast_exp::exp_shifted(row, max, Some(e));
                    let weighted = dot(e, row);
                    total.ln() + max - weighted / total
                },
            )
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(m)))
    }
}

/// Entropy of each row's softmax: logits [M, V] f32 on the CPU -> [M].
pub fn row_entropy(logits: &Tensor) -> Result<Tensor> {
    logits.detach().contiguous()?.apply_op1_no_bwd(&RowEntropy)
}
