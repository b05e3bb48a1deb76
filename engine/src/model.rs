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

mod kv_cache;
pub use kv_cache::KvCache;
mod rope;
pub(crate) use rope::rope_inv_freq;

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

mod params;
pub use params::{param_shapes, projection_shape};

impl Llama {
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
        let h = rms_norm(x, &self.weight(&blk.input_layernorm), cfg.rms_norm_eps)?;
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
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache.as_deref_mut() {
            None => (k, v),
            Some(c) => c.append(l, k, v)?,
        };
        // Group query heads by their shared KV head instead of repeating K/V:
        // head h uses KV head h / rep, as transformers' repeat_kv does.
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let decoding = cache.as_deref().is_some_and(|c| c.capacity > 0);
        let prefix = cache.as_deref().and_then(|c| c.prefix.as_ref());
        let fused = match (decoding, crate::fused::usable(&k), bias5.as_ref()) {
            (true, true, Some(bias5)) => Some(bias5),
            _ => None,
        };
        if prefix.is_some() && fused.is_none() {
            // KvCache::branch shares a prefix only where the kernel reads it.
            return Err(EngineError::Input(
                "a shared KV prefix needs the fused decode kernel (f32 on the CPU)".into(),
            ));
        }
        let tk = k.dim(2)?;
        let att = if let Some(bias5) = fused {
            // Generation: straight over the cache's buffers.
            let shared = prefix.map(|p| (&p.layers[l].0, &p.layers[l].1, p.owner.as_slice()));
            crate::fused::decode_attention(&q, shared, &k, &v, bias5, scale)?
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

    /// Whether activation checkpointing is on.
    pub fn is_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
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
}

/// Masked value used in attention biases (re-exported for builders).
pub const MASK_VALUE: f32 = MASKED;
