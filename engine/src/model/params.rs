//! The model's parameters: building it from named tensors (or at random),
//! the names and shapes Hugging Face gives them, which are trained (LoRA
//! freezes the base), the dtypes they are kept and computed in, and the
//! weights handed back (merged with an adapter, copied, counted). The
//! forward pass is `model.rs`.

use super::*;

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
    pub(super) fn weight(&self, v: &Var) -> Tensor {
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
    pub(super) fn stored_weight(&self, v: &Var) -> Tensor {
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
