//! RoPE's inverse frequencies for each scaling a config may name (llama3,
//! linear, dynamic, yarn), computed as transformers computes them.

use super::*;

/// RoPE inverse frequencies and the cos/sin scale, as transformers'
/// `ROPE_INIT_FUNCTIONS` compute them for each `rope_type`.
pub(crate) fn rope_inv_freq(cfg: &LlamaConfig) -> (Vec<f32>, f64) {
    use crate::config::RopeScaling;
    let hd = cfg.head_dim;
    let base = cfg.rope_theta;
    let default = |base: f64| -> Vec<f64> {
        (0..hd / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / hd as f64))
            .collect()
    };
    let mut inv = default(base);
    let mut scale = 1.0;
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Dynamic { .. }) => {} // dynamic: the default up to max_position_embeddings
        Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor),
        Some(RopeScaling::Llama3(s)) => {
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        }) => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            scale = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                }
                _ => get_mscale(*factor, 1.0),
            };
            let dim = hd as f64;
            let max_pos = *original_max_position_embeddings as f64;
            let correction = |rotations: f64| {
                dim * (max_pos / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
            };
            let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            for (i, f) in inv.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                *f = (*f / factor) * (1.0 - extrapolation) + *f * extrapolation;
            }
        }
    }
    (inv.into_iter().map(|f| f as f32).collect(), scale)
}
