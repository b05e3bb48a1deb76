//! exp for the softmax kernels: Cephes' single-precision polynomial (within
//! 2 ulp of `f32::exp` on its range), 8 lanes at a time with AVX2+FMA. The
//! same polynomial serves the tail and CPUs without AVX2, so a row's values
//! do not depend on where it starts. Below -87.3 (where `f32::exp`
//! underflows to subnormals) it returns 0, as masked logits need.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const LOW: f32 = -87.33;
const HIGH: f32 = 88.37;

pub(super) fn exp(x: f32) -> f32 {
    if x < LOW {
        return 0.0;
    }
    // Fused multiply-adds as in the vector code, so lanes and tail agree.
    let x = x.min(HIGH);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = (p * r).mul_add(r, r) + 1.0;
    y * f32::from_bits((((n as i32) + 127) as u32) << 23)
}

/// o[j] = scale * x[j] + b[j]; returns max(o). Vectorized because the
/// max reduction is not (NaN rules keep the compiler from it).
pub(super) fn scale_add_max(x: &[f32], scale: f32, b: &[f32], o: &mut [f32]) -> f32 {
    assert!(
        x.len() == b.len() && x.len() == o.len(),
        "scale_add_max: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx2_fma() {
            // SAFETY: AVX2 and FMA are present; all three slices have
            // the same length (asserted above).
            return unsafe { scale_add_max_avx2(x, scale, b, o) };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for j in 0..x.len() {
        o[j] = scale.mul_add(x[j], b[j]);
        max = max.max(o[j]);
    }
    max
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scale_add_max_avx2(x: &[f32], scale: f32, b: &[f32], o: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n8 = x.len() / 8 * 8;
    let sv = _mm256_set1_ps(scale);
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j < n8 {
        let v = _mm256_fmadd_ps(
            sv,
            _mm256_loadu_ps(x.as_ptr().add(j)),
            _mm256_loadu_ps(b.as_ptr().add(j)),
        );
        _mm256_storeu_ps(o.as_mut_ptr().add(j), v);
        mv = _mm256_max_ps(mv, v);
        j += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for k in n8..x.len() {
        o[k] = scale.mul_add(x[k], b[k]);
        max = max.max(o[k]);
    }
    max
}

/// v[j] = exp(v[j] - shift); returns the sum.
pub(super) fn exp_shifted_inplace(v: &mut [f32], shift: f32) -> f32 {
    let len = v.len();
    let p = v.as_mut_ptr();
    // SAFETY: reads and writes `len` floats at `p`, which `v` owns; each
    // element is read before it is written, so aliasing is harmless.
    unsafe { exp_shifted_raw(p, p, len, shift) }
}

/// dst[j] = exp(src[j] - shift) (or only the sum when `dst` is None);
/// returns the sum.
pub(super) fn exp_shifted(src: &[f32], shift: f32, dst: Option<&mut [f32]>) -> f32 {
    let dst = match dst {
        Some(d) => {
            assert_eq!(d.len(), src.len(), "exp_shifted: length mismatch");
            d.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: `src` has `src.len()` floats, `dst` is null or as long.
    unsafe { exp_shifted_raw(src.as_ptr(), dst, src.len(), shift) }
}

/// # Safety
/// `src` is valid for `len` reads; `dst` is null or valid for `len`
/// writes (it may equal `src`).
unsafe fn exp_shifted_raw(src: *const f32, dst: *mut f32, len: usize, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::avx2_fma() {
            // SAFETY: AVX2 and FMA are present (checked above); the
            // pointer contract is the caller's.
            return unsafe { exp_shifted_avx2(src, dst, len, shift) };
        }
    }
    let mut sum = 0f32;
    for j in 0..len {
        // SAFETY: j < len, per the contract.
        let e = exp(unsafe { *src.add(j) } - shift);
        if !dst.is_null() {
            unsafe { *dst.add(j) = e };
        }
        sum += e;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(src: *const f32, dst: *mut f32, len: usize, shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let n8 = len / 8 * 8;
    let shift_v = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut j = 0;
    while j < n8 {
        let x = _mm256_sub_ps(_mm256_loadu_ps(src.add(j)), shift_v);
        let under = _mm256_cmp_ps(x, _mm256_set1_ps(LOW), _CMP_LT_OQ);
        let x = _mm256_min_ps(x, _mm256_set1_ps(HIGH));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        let e = _mm256_andnot_ps(under, _mm256_mul_ps(y, pow2));
        if !dst.is_null() {
            _mm256_storeu_ps(dst.add(j), e);
        }
        acc = _mm256_add_ps(acc, e);
        j += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for k in n8..len {
        let e = exp(*src.add(k) - shift);
        if !dst.is_null() {
            *dst.add(k) = e;
        }
        sum += e;
    }
    sum
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_std_exp() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0441).collect();
        let mut out = vec![0f32; xs.len()];
        let sum = super::exp_shifted(&xs, 0.0, Some(&mut out));
        let mut want_sum = 0f64;
        for (x, e) in xs.iter().zip(&out) {
            let want = (*x as f64).exp();
            want_sum += if *x < super::LOW { 0.0 } else { want };
            if *x >= super::LOW {
                assert!(
                    ((*e as f64) - want).abs() <= 3e-7 * want,
                    "exp({x}) = {e}, want {want}"
                );
                assert_eq!(*e, super::exp(*x), "lanes and tail agree at {x}");
            } else {
                assert_eq!(*e, 0.0);
            }
        }
        assert!(sum.is_infinite() && want_sum > f32::MAX as f64);
        // As softmax uses it: shifted by the max, the sum is accurate.
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = super::exp_shifted(&xs, max, None);
        let want: f64 = xs.iter().map(|x| ((*x - max) as f64).exp()).sum();
        assert!(((sum as f64) - want).abs() < 1e-6 * want, "{sum} vs {want}");
        assert_eq!(super::exp(-1e9), 0.0);
    }
}
