//! The Llama model, whole, in one file.
//!
//! Decoder-only transformer as in Llama 3: token embedding, N blocks of
//! (RMSNorm -> grouped-query attention with RoPE -> residual, RMSNorm ->
//! SwiGLU MLP -> residual), final RMSNorm, then either the LM head (next-token
//! logits) or a one-output score head (a reward model, as transformers'
//! LlamaForSequenceClassification). Parameters are f32 `Var`s named exactly as
//! Hugging Face names them, so checkpoints move both ways unchanged.
//!
//! Shapes: B batch, T sequence, H hidden, V vocab, nh query heads, nkv
//! key/value heads, hd head dim, rep = nh / nkv.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::ops::{apply_rope, rms_norm, softmax, MASKED};

/// One transformer block's parameters.
pub struct Block {
    pub input_layernorm: Var,          // [H]
    pub q_proj: Var,                   // [nh*hd, H]
    pub k_proj: Var,                   // [nkv*hd, H]
    pub v_proj: Var,                   // [nkv*hd, H]
    pub o_proj: Var,                   // [H, nh*hd]
    pub post_attention_layernorm: Var, // [H]
    pub gate_proj: Var,                // [I, H]
    pub up_proj: Var,                  // [I, H]
    pub down_proj: Var,                // [H, I]
    /// Biases by projection name ([out] each), where the config has them
    /// (`attention_bias`, `mlp_bias`, Qwen2's q/k/v).
    pub biases: BTreeMap<&'static str, Var>,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Var, // [V, H]
    pub layers: Vec<Block>,
    pub norm: Var, // [H]
    /// [V, H]; None when tied to the embedding or for a reward model.
    pub lm_head: Option<Var>,
    /// [1, H] for a reward model.
    pub score: Option<Var>,
    /// A LoRA adapter on the blocks' projections (`crate::lora`).
    pub lora: Option<crate::lora::Lora>,
    /// The base weights take no gradient (LoRA trains only its adapter and,
    /// for a reward model, the score head): backward then computes no dW
    /// for them and keeps none.
    base_frozen: bool,
    /// The dtype activations are computed in: the weights' own, or bf16
    /// over f32 master weights (see [`Llama::compute_in_bf16`]).
    compute: DType,
    /// Activation checkpointing (see [`Llama::set_checkpointing`]).
    checkpointing: AtomicBool,
    /// Forward passes run under checkpointing whose backward is not done.
    pending: Mutex<Vec<Checkpointed>>,
    pub device: Device,
    inv_freq: Tensor, // [hd/2]
    /// YaRN's attention factor: cos and sin are scaled by it (1 otherwise).
    rope_scale: f64,
}

/// What one block needs besides its input: shapes, RoPE tables, the mask.
#[derive(Clone)]
struct BlockInputs {
    b: usize,
    t: usize,
    cos: Tensor, // [B, 1, T, hd]
    sin: Tensor,
    /// [B, 1, 1, T, Tk] additive bias for the unfused softmax.
    bias: Tensor,
    /// [B, 1, T, Tk] contiguous, for the fused kernels.
    bias5: Option<Tensor>,
}

/// A forward pass run with activation checkpointing: only each block's
/// input is kept; the blocks are recomputed, one at a time, in backward.
struct Checkpointed {
    ids: Tensor,
    inputs: BlockInputs,
    /// Block l's input [B, T, H], detached.
    block_inputs: Vec<Tensor>,
    /// The adapter's dropout stream before block l, so the recomputation
    /// draws the same masks.
    dropout_states: Vec<Option<crate::rng::Rng>>,
    /// The last block's output as a leaf: its gradient starts the
    /// recomputation.
    leaf: Var,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("params", &self.num_params())
            .finish()
    }
}

/// Per-layer cached keys and values for incremental decoding.
///
/// Two ways to grow: by concatenation (the default; what training's shared
/// prompts use, gradients flowing through), or, with a capacity, by writing
/// each step's keys and values in place into buffers sized once (decoding:
/// concatenating copied the whole cache every step, and the fresh pages
/// cost as much again).
#[derive(Default)]
pub struct KvCache {
    /// (k, v) per layer, each [B, nkv, Tc, hd]; with a capacity, the whole
    /// buffers [B, nkv, capacity, hd], of which `len` positions are filled.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// 0: grow by concatenation.
    pub capacity: usize,
    /// Positions filled.
    pub len: usize,
}

impl KvCache {
    /// A cache that holds at most `capacity` positions, written in place
    /// (inference only: no gradient flows through an in-place write).
    pub fn with_capacity(capacity: usize) -> Self {
        KvCache {
            layers: vec![],
            capacity,
            len: 0,
        }
    }

    /// Add layer `l`'s keys and values of `t` new positions ([B, nkv, t, hd]);
    /// returns all of that layer's keys and values so far.
    fn append(&mut self, l: usize, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.capacity == 0 {
            let (k, v) = match self.layers[l].take() {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            };
            self.layers[l] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        }
        let (b, nkv, t, hd) = k.dims4()?;
        if self.len + t > self.capacity {
            candle_core::bail!(
                "KV cache of {} positions is full ({} filled, {t} more)",
                self.capacity,
                self.len
            );
        }
        if self.layers[l].is_none() {
            let buffer = || Tensor::zeros((b, nkv, self.capacity, hd), k.dtype(), k.device());
            self.layers[l] = Some((buffer()?, buffer()?));
        }
        let (kb, vb) = self.layers[l].as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            kb.narrow(2, 0, self.len + t)?,
            vb.narrow(2, 0, self.len + t)?,
        ))
    }

    /// Keep rows `idx` of the batch (in that order, repeats allowed): each
    /// prompt's keys and values copied to the rows that continue it.
    pub fn select_rows(&mut self, idx: &Tensor) -> candle_core::Result<()> {
        for layer in self.layers.iter_mut() {
            if let Some((k, v)) = layer.take() {
                *layer = Some((k.index_select(idx, 0)?, v.index_select(idx, 0)?));
            }
        }
        Ok(())
    }
}

/// x @ w^T over the last dim: [.., in] -> [.., out].
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let (rows, inp) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x = x.reshape((rows, inp))?;
    // A weight stored in another dtype than the activations: a frozen bf16
    // base under f32 compute on the CPU (no f32 copy kept), or an f32
    // master weight used in bf16 (cast: its gradient flows back in f32).
    let w = &if w.dtype() == x.dtype() {
        w.clone()
    } else if w.dtype() == DType::BF16 && x.dtype() == DType::F32 && x.device().is_cpu() {
        let out = crate::fused::frozen_linear(&x, w)?;
        let mut shape = dims;
        *shape.last_mut().expect("at least one dim") = out.dim(1)?;
        return out.reshape(shape);
    } else {
        w.to_dtype(x.dtype())?
    };
    let out = if rows <= crate::fused::FEW_ROWS
        && crate::fused::usable(&x)
        && crate::fused::usable(w)
        && w.is_contiguous()
    {
        crate::fused::linear_few_rows(&x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    let mut shape = dims;
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    out.reshape(shape)
}

/// RoPE inverse frequencies and the cos/sin scale, as transformers'
/// `ROPE_INIT_FUNCTIONS` compute them for each `rope_type`.
fn rope_inv_freq(cfg: &LlamaConfig) -> (Vec<f32>, f64) {
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

/// [out, in] of a block's projection `proj` (q_proj, ..., down_proj).
pub fn projection_shape(cfg: &LlamaConfig, proj: &str) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    match proj {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (i, h),
        "down_proj" => (h, i),
        other => panic!("no projection {other}"),
    }
}

/// Expected shape of every parameter, by Hugging Face name, sorted.
pub fn param_shapes(cfg: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        m.insert(format!("{p}input_layernorm.weight"), vec![h]);
        m.insert(format!("{p}post_attention_layernorm.weight"), vec![h]);
        for (proj, module) in crate::lora::PROJECTIONS {
            let (out, inp) = projection_shape(cfg, proj);
            m.insert(format!("{p}{module}.{proj}.weight"), vec![out, inp]);
            if cfg.has_bias(proj) {
                m.insert(format!("{p}{module}.{proj}.bias"), vec![out]);
            }
        }
    }
    if cfg.num_labels == 1 {
        m.insert("score.weight".to_string(), vec![1, h]);
    } else if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![v, h]);
    }
    m
}

impl Llama {
    /// Build from named f32 tensors; every expected name must be present with
    /// its expected shape.
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_tensors_dtype(config, tensors, device, DType::F32)
    }

    /// As `from_tensors`, with parameters in `dtype` (f32 to train; f64 for
    /// finite-difference gradient checks).
    pub fn from_tensors_dtype(
        config: LlamaConfig,
        mut tensors: BTreeMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let shapes = param_shapes(&config);
        for (name, shape) in &shapes {
            let t = tensors
                .get(name)
                .ok_or_else(|| EngineError::Input(format!("missing tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(EngineError::Input(format!(
                    "tensor `{name}` has shape {:?}, the config implies {:?}",
                    t.dims(),
                    shape
                )));
            }
        }
        let mut take = |name: &str| -> Result<Var> {
            let t = tensors.remove(name).expect("checked above");
            Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)
        };
        let embed_tokens = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            layers.push(Block {
                input_layernorm: take(&format!("{p}input_layernorm.weight"))?,
                q_proj: take(&format!("{p}self_attn.q_proj.weight"))?,
                k_proj: take(&format!("{p}self_attn.k_proj.weight"))?,
                v_proj: take(&format!("{p}self_attn.v_proj.weight"))?,
                o_proj: take(&format!("{p}self_attn.o_proj.weight"))?,
                post_attention_layernorm: take(&format!("{p}post_attention_layernorm.weight"))?,
                gate_proj: take(&format!("{p}mlp.gate_proj.weight"))?,
                up_proj: take(&format!("{p}mlp.up_proj.weight"))?,
                down_proj: take(&format!("{p}mlp.down_proj.weight"))?,
                biases: crate::lora::PROJECTIONS
                    .into_iter()
                    .filter(|(proj, _)| config.has_bias(proj))
                    .map(|(proj, module)| Ok((proj, take(&format!("{p}{module}.{proj}.bias"))?)))
                    .collect::<Result<_>>()?,
            });
        }
        let score = if config.num_labels == 1 {
            Some(take("score.weight")?)
        } else {
            None
        };
        let lm_head = if config.num_labels == 0 && !config.tie_word_embeddings {
            Some(take("lm_head.weight")?)
        } else {
            None
        };
        let (inv, rope_scale) = rope_inv_freq(&config);
        let inv_freq = Tensor::from_vec(inv.clone(), inv.len(), device)?;
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            lora: None,
            base_frozen: false,
            compute: dtype,
            checkpointing: AtomicBool::new(false),
            pending: Mutex::new(vec![]),
            device: device.clone(),
            inv_freq,
            rope_scale,
        })
    }

    /// Random init (normal with std 0.02, norms at 1), seeded: the same seed
    /// gives the same weights on every machine.
    pub fn init(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let tensors = param_shapes(&config)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| 0.02 * rng.normal()).collect()
                };
                Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Self::from_tensors(config, tensors, device)
    }

    /// Every trainable parameter with its Hugging Face name, sorted by name.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.clone(),
            ),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        for (l, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}.");
            out.push((
                format!("{p}input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            out.push((format!("{p}self_attn.q_proj.weight"), b.q_proj.clone()));
            out.push((format!("{p}self_attn.k_proj.weight"), b.k_proj.clone()));
            out.push((format!("{p}self_attn.v_proj.weight"), b.v_proj.clone()));
            out.push((format!("{p}self_attn.o_proj.weight"), b.o_proj.clone()));
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
            out.push((format!("{p}mlp.gate_proj.weight"), b.gate_proj.clone()));
            out.push((format!("{p}mlp.up_proj.weight"), b.up_proj.clone()));
            out.push((format!("{p}mlp.down_proj.weight"), b.down_proj.clone()));
            for (proj, v) in &b.biases {
                let module = crate::lora::module_of(proj);
                out.push((format!("{p}{module}.{proj}.bias"), v.clone()));
            }
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        if let Some(s) = &self.score {
            out.push(("score.weight".to_string(), s.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Freeze (or unfreeze) the base weights: they stay the same tensors,
    /// but the graph no longer tracks them, so no gradient is computed for
    /// them. The score head of a reward model stays trainable.
    pub fn freeze_base(&mut self, frozen: bool) {
        self.base_frozen = frozen;
    }

    pub fn is_base_frozen(&self) -> bool {
        self.base_frozen
    }

    /// What an optimizer should update: the adapter (and a reward model's
    /// score head) when the base is frozen, else every weight (and the
    /// adapter, when one is attached).
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let adapter = self.lora.iter().flat_map(|l| l.params());
        if self.base_frozen {
            let score = self
                .score
                .iter()
                .map(|s| ("score.weight".to_string(), s.clone()));
            let mut out: Vec<(String, Var)> = adapter.chain(score).collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            return out;
        }
        let mut out = self.params();
        out.extend(adapter);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A base weight as the forward pass uses it: detached from the graph
    /// when the base is frozen (same storage, no copy).
    fn weight(&self, v: &Var) -> Tensor {
        let w = self.stored_weight(v);
        if w.dtype() == self.compute {
            return w;
        }
        // An f32 master weight used in bf16: the cast's backward brings its
        // gradient back in f32.
        w.to_dtype(self.compute).expect("a float dtype cast")
    }

    /// A base weight as stored (see [`Llama::weight`]), for the matmuls:
    /// `linear` computes with a frozen bf16 weight without an f32 copy.
    fn stored_weight(&self, v: &Var) -> Tensor {
        if self.base_frozen {
            v.as_tensor().detach()
        } else {
            v.as_tensor().clone()
        }
    }

    /// The dtype activations are computed in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Compute in bf16 from here on. A frozen base is stored in bf16 (half
    /// its memory); weights that train (every weight in full fine-tuning, a
    /// reward model's score head) stay f32 master weights, cast to bf16
    /// where they are used, so their gradients and AdamW's moments and
    /// updates stay f32 and small updates are not rounded away. An adapter
    /// always computes and trains in f32. Call after `freeze_base`.
    pub fn compute_in_bf16(&mut self) -> Result<()> {
        self.compute = DType::BF16;
        if !self.base_frozen {
            return Ok(());
        }
        self.store_frozen_base_in_bf16()
    }

    /// Store the frozen base in bf16 (half its memory) and go on computing
    /// in the current dtype: what `dtype=bf16` does on the CPU, whose
    /// backend has no bf16 arithmetic (its matmul widens to f32). The
    /// projections then widen their weight inside the product
    /// (`fused::frozen_linear`), never keeping an f32 copy.
    pub fn store_frozen_base_in_bf16(&mut self) -> Result<()> {
        if !self.base_frozen {
            return Err(EngineError::Input(
                "only a frozen base (LoRA) is stored in bf16; full fine-tuning keeps f32 master weights".into(),
            ));
        }
        let to_bf16 = |v: &mut Var| -> Result<()> {
            *v = Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16)?)?;
            Ok(())
        };
        to_bf16(&mut self.embed_tokens)?;
        to_bf16(&mut self.norm)?;
        if let Some(h) = self.lm_head.as_mut() {
            to_bf16(h)?;
        }
        for blk in &mut self.layers {
            for v in [
                &mut blk.input_layernorm,
                &mut blk.q_proj,
                &mut blk.k_proj,
                &mut blk.v_proj,
                &mut blk.o_proj,
                &mut blk.post_attention_layernorm,
                &mut blk.gate_proj,
                &mut blk.up_proj,
                &mut blk.down_proj,
            ] {
                to_bf16(v)?;
            }
            for v in blk.biases.values_mut() {
                to_bf16(v)?;
            }
        }
        Ok(())
    }

    /// Block `l`'s projection `proj` of x: x Wᵀ, plus the adapter's
    /// scale · (x Aᵀ) Bᵀ where one is attached, targets it and is on.
    fn project(
        &self,
        l: usize,
        proj: &'static str,
        x: &Tensor,
        w: &Var,
    ) -> candle_core::Result<Tensor> {
        let mut y = linear(x, &self.stored_weight(w))?;
        if let Some(bias) = self.layers[l].biases.get(proj) {
            y = y.broadcast_add(&self.weight(bias).to_dtype(y.dtype())?)?;
        }
        let Some(lora) = self.lora.as_ref().filter(|a| a.enabled()) else {
            return Ok(y);
        };
        match lora.adapters.get(&(l, proj)) {
            None => Ok(y),
            Some((a, b)) => {
                // The adapter computes in its own dtype (f32), as PEFT does.
                // scale folded into B ([out, r], small) rather than applied
                // to the [tokens, out] delta: one full-size intermediate
                // fewer kept for backward per projection.
                let x = lora.dropped(x)?.to_dtype(a.dtype())?;
                let delta = linear(&linear(&x, a)?, &(b.as_tensor() * lora.config.scale())?)?;
                let dtype = y.dtype();
                y + delta.to_dtype(dtype)?
            }
        }
    }

    /// The weights with the adapter merged in (W + scale · B A for every
    /// targeted projection): a plain checkpoint that computes what the
    /// model with its adapter computes.
    pub fn merged_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.tensors();
        if let Some(lora) = &self.lora {
            for (l, proj) in lora.adapters.keys() {
                let module = crate::lora::module_of(proj);
                let name = format!("model.layers.{l}.{module}.{proj}.weight");
                let delta = lora.delta(*l, proj)?.expect("listed adapter");
                let w = &out[&name];
                let merged = (w + delta.to_dtype(w.dtype())?)?;
                out.insert(name, merged);
            }
        }
        Ok(out)
    }

    /// cos, sin for RoPE at the given positions: [B, T] -> each [B, 1, T, hd].
    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?; // [B, T, hd/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // [B, 1, T, hd]
        let dtype = self.compute;
        let (cos, sin) = (emb.cos()?, emb.sin()?);
        let (cos, sin) = if self.rope_scale == 1.0 {
            (cos, sin)
        } else {
            ((cos * self.rope_scale)?, (sin * self.rope_scale)?)
        };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// Refuse what herd would compute differently from the model's own
    /// code: attention over more keys than a sliding window holds (herd
    /// attends to all of them), or, with dynamic NTK RoPE, past
    /// `max_position_embeddings` (where transformers rescales per call).
    fn check_span(&self, keys: usize) -> Result<()> {
        let cfg = &self.config;
        if let Some(w) = cfg.sliding_window.filter(|w| keys > *w) {
            return Err(EngineError::Input(format!(
                "a sequence of {keys} tokens is longer than the model's sliding window ({w}); herd computes full attention, so keep sequences within the window (max_seq_len, max_new_tokens)"
            )));
        }
        if matches!(
            cfg.rope_scaling,
            Some(crate::config::RopeScaling::Dynamic { .. })
        ) && keys > cfg.max_position_embeddings
        {
            return Err(EngineError::Input(format!(
                "a sequence of {keys} tokens is past max_position_embeddings ({}), where dynamic NTK RoPE rescales per call; herd computes it up to that length",
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Final hidden states [B, T, H].
    ///
    /// * `ids`: [B, T] u32.
    /// * `positions`: [B, T] u32 (RoPE positions; restart them to pack rows).
    /// * `bias`: additive attention bias [B, 1, T, Tk] (0 or MASKED), where
    ///   Tk = cached + T; build it with [`crate::batch`].
    /// * `cache`: keys/values of earlier tokens, extended in place.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t) = ids.dims2()?;
        self.check_span(bias.dim(D::Minus1)?)?;
        let (cos, sin) = self.rope_tables(positions)?;
        let bias = bias.to_dtype(self.compute)?;
        let bias5 = if crate::fused::usable(&bias) {
            Some(bias.contiguous()?)
        } else {
            None
        }; // [B, 1, T, Tk]
        let inputs = BlockInputs {
            b,
            t,
            cos,
            sin,
            bias: bias.unsqueeze(2)?, // [B, 1, 1, T, Tk]
            bias5,
        };
        let mut x = self.embed(ids)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(cfg.num_hidden_layers, || None);
        }
        if self.checkpointing.load(Ordering::Relaxed) && cache.is_none() {
            // Keep each block's input only; the graph of each block is
            // dropped as soon as its output is detached.
            let mut block_inputs = Vec::with_capacity(self.layers.len());
            let mut dropout_states = Vec::with_capacity(self.layers.len());
            x = x.detach();
            for l in 0..self.layers.len() {
                block_inputs.push(x.clone());
                dropout_states.push(self.lora.as_ref().map(|a| a.dropout_state()));
                x = self.block(l, &x, &inputs, None)?.detach();
            }
            let leaf = Var::from_tensor(&x)?;
            x = leaf.as_tensor().clone();
            self.pending
                .lock()
                .expect("pending lock")
                .push(Checkpointed {
                    ids: ids.clone(),
                    inputs,
                    block_inputs,
                    dropout_states,
                    leaf,
                });
        } else {
            for l in 0..self.layers.len() {
                x = self.block(l, &x, &inputs, cache.as_deref_mut())?;
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(rms_norm(&x, &self.weight(&self.norm), cfg.rms_norm_eps)?)
    }

    /// Token embeddings [B, T, H] of ids [B, T].
    /// Token embeddings [B, T, H]. As transformers' `nn.Embedding(...,
    /// padding_idx=pad_token_id)`, the pad token's row takes no gradient
    /// from the lookup (it may still train through a tied LM head).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = self
            .stored_weight(&self.embed_tokens)
            .index_select(&flat, 0)?;
        let rows = match self.config.pad_token_id {
            Some(pad) if !self.base_frozen && flat.to_vec1::<u32>()?.contains(&pad) => {
                let is_pad = flat.eq(pad)?.to_dtype(rows.dtype())?.unsqueeze(1)?; // [B*T, 1]
                                                                                  // Same values; the pad positions' share of the gradient is cut.
                (rows.broadcast_mul(&(1.0 - &is_pad)?)? + rows.detach().broadcast_mul(&is_pad)?)?
            }
            _ => rows,
        };
        Ok(rows
            .reshape((b, t, self.config.hidden_size))?
            .to_dtype(self.compute)?)
    }

    /// Block `l` on x [B, T, H]: attention then the SwiGLU MLP, each with
    /// its residual.
    fn block(
        &self,
        l: usize,
        x: &Tensor,
        inputs: &BlockInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let blk = &self.layers[l];
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let BlockInputs {
            b,
            t,
            cos,
            sin,
            bias,
            bias5,
        } = inputs;
        let (b, t) = (*b, *t);
        // Attention.
        let h = rms_norm(&x, &self.weight(&blk.input_layernorm), cfg.rms_norm_eps)?;
        let q = self
            .project(l, "q_proj", &h, &blk.q_proj)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?; // [B, nh, T, hd]
        let k = self
            .project(l, "k_proj", &h, &blk.k_proj)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?; // [B, nkv, T, hd]
        let v = self
            .project(l, "v_proj", &h, &blk.v_proj)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = apply_rope(&q, &cos, &sin)?;
        let k = apply_rope(&k, &cos, &sin)?;
        let (k, v) = match cache.as_deref_mut() {
            None => (k, v),
            Some(c) => c.append(l, k, v)?,
        };
        let tk = k.dim(2)?;
        // Group query heads by their shared KV head instead of repeating K/V:
        // head h uses KV head h / rep, as transformers' repeat_kv does.
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let decoding = cache.as_deref().is_some_and(|c| c.capacity > 0);
        let att = if let (true, true, Some(bias5)) =
            (decoding, crate::fused::usable(&k), bias5.as_ref())
        {
            // Generation: straight over the cache's buffers.
            crate::fused::decode_attention(&q, &k, &v, bias5, scale)?
        } else {
            let scores = q.matmul(&k.t()?)?; // [B, nkv, rep*T, Tk]
            let probs = if crate::fused::usable(&scores) {
                // One parallel pass: scale, mask, softmax (own backward).
                crate::fused::masked_softmax(
                    &scores.reshape((b, nkv * rep, t, tk))?,
                    bias5.as_ref().expect("bias"),
                    scale,
                )?
            } else {
                // Softmax in f32 whatever the compute dtype (as
                // transformers' eager attention does).
                let dtype = scores.dtype();
                let up = if dtype == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let scores = (scores.to_dtype(up)? * scale)?
                    .reshape((b, nkv, rep, t, tk))?
                    .broadcast_add(&bias.to_dtype(up)?)?;
                softmax(&scores)?.to_dtype(dtype)?
            }
            .reshape((b, nkv, rep * t, tk))?;
            probs.matmul(&v)?
        };
        let att = att
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        let x = (x + self.project(l, "o_proj", &att, &blk.o_proj)?)?;
        // SwiGLU MLP.
        let h = rms_norm(
            &x,
            &self.weight(&blk.post_attention_layernorm),
            cfg.rms_norm_eps,
        )?;
        let (gate, up) = (
            self.project(l, "gate_proj", &h, &blk.gate_proj)?,
            self.project(l, "up_proj", &h, &blk.up_proj)?,
        );
        let gated = if crate::fused::usable(&gate) {
            crate::fused::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        Ok((x + self.project(l, "down_proj", &gated, &blk.down_proj)?)?)
    }

    /// Activation checkpointing on or off: forward passes then keep only
    /// each block's input, and [`Llama::finish_backward`] recomputes the
    /// blocks one at a time. Memory for activations drops from all blocks'
    /// to one block's plus the inputs, for about one more forward pass.
    pub fn set_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
        self.pending.lock().expect("pending lock").clear();
    }

    /// Complete `store` (from `loss.backward()`) through the blocks of
    /// every forward pass run under checkpointing since the last call: the
    /// gradient at each pass's last block is carried back block by block,
    /// recomputing each, and every trainable weight's share is added.
    pub fn finish_backward(&self, store: &mut candle_core::backprop::GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        if pending.is_empty() {
            return Ok(());
        }
        let params = self.trainable_params();
        let after = self.lora.as_ref().map(|a| a.dropout_state());
        for call in pending.into_iter().rev() {
            let Some(mut g) = store.remove(call.leaf.as_tensor()) else {
                continue; // not part of the loss
            };
            let add = |store: &mut candle_core::backprop::GradStore,
                       part: &candle_core::backprop::GradStore|
             -> Result<()> {
                for (_, v) in &params {
                    if let Some(new) = part.get(v.as_tensor()) {
                        let sum = match store.get(v.as_tensor()) {
                            Some(old) => (old + new)?,
                            None => new.clone(),
                        };
                        store.insert(v.as_tensor(), sum);
                    }
                }
                Ok(())
            };
            for l in (0..self.layers.len()).rev() {
                if let (Some(lora), Some(state)) = (&self.lora, &call.dropout_states[l]) {
                    lora.set_dropout_state(state.clone());
                }
                let input = Var::from_tensor(&call.block_inputs[l])?;
                let out = self.block(l, input.as_tensor(), &call.inputs, None)?;
                let part = (out * &g)?.sum_all()?.backward()?;
                add(store, &part)?;
                g = part
                    .get(input.as_tensor())
                    .cloned()
                    .ok_or_else(|| EngineError::NoGradient(format!("input of block {l}")))?;
            }
            if !self.base_frozen {
                let part = (self.embed(&call.ids)? * &g)?.sum_all()?.backward()?;
                add(store, &part)?;
            }
        }
        if let (Some(lora), Some(state)) = (&self.lora, after) {
            lora.set_dropout_state(state);
        }
        Ok(())
    }

    /// The LM head's weight [V, H] when it takes no gradient (a frozen
    /// base) and the fused CPU path applies: log-probabilities can then go
    /// straight from hidden states without keeping the logits
    /// (`fused::head_logprob`).
    pub fn frozen_f32_head(&self) -> Option<Tensor> {
        if !self.base_frozen || self.config.num_labels == 1 || self.compute != DType::F32 {
            return None;
        }
        let w = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .as_tensor();
        (w.dtype() == DType::F32 && w.device().is_cpu()).then(|| w.detach())
    }

    /// Next-token logits [B, T, V] from hidden states.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = match (&self.lm_head, self.config.num_labels) {
            (_, 1) => return Err(EngineError::Input("a reward model has no LM head".into())),
            (Some(h), _) => self.stored_weight(h),
            (None, _) => self.stored_weight(&self.embed_tokens),
        };
        let logits = linear(hidden, &w)?;
        // Log-softmax wants f32 (transformers upcasts logits for the loss).
        Ok(match logits.dtype() {
            DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
            _ => logits,
        })
    }

    /// Rewards at chosen tokens: hidden [B, T, H], flat indices (row * T +
    /// position) -> [R].
    pub fn rewards_at(&self, hidden: &Tensor, flat_index: &[u32]) -> Result<Tensor> {
        let score = self
            .score
            .as_ref()
            .ok_or_else(|| EngineError::Input("not a reward model (no score head)".into()))?;
        let (b, t, h) = hidden.dims3()?;
        let idx = Tensor::new(flat_index, hidden.device())?;
        let picked = hidden
            .reshape((b * t, h))?
            .index_select(&idx, 0)?
            .to_dtype(score.dtype())?; // [R, H]
        Ok(linear(&picked, score.as_tensor())?.squeeze(D::Minus1)?)
    }

    /// Convenience: logits of plain causal rows without padding.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, &self.device)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let bias = crate::batch::causal_bias(b, t, &self.device)?;
        let h = self.forward_hidden(ids, &positions, &bias, None)?;
        self.lm_logits(&h)
    }

    /// A fresh copy of the weights (new Vars), e.g. a frozen reference model.
    pub fn deep_clone(&self) -> Result<Self> {
        let tensors = self
            .params()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Self::from_tensors_dtype(self.config.clone(), tensors, &self.device, self.compute)
    }

    /// Weights as plain tensors by name (shares storage; copy before mutating).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Masked value used in attention biases (re-exported for builders).
pub const MASK_VALUE: f32 = MASKED;
