//! Hugging Face model directories in and out.
//!
//! In: `config.json` (old or new keys), `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, `tokenizer.json`; f32, bf16 or f16 weights,
//! trained in f32. Out: the same layout with Hugging Face tensor names, the
//! weights in the config's dtype, `{"format": "pt"}` metadata so transformers
//! opens it. The bytes written depend only on the weights (sorted names, fixed
//! metadata), which is what makes checkpoints comparable by hash.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::chat::ChatFormat;
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::model::Llama;

pub const WEIGHTS: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// Read every tensor of a checkpoint directory (single file or shards).
pub fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let single = dir.join(WEIGHTS);
    let index = dir.join(INDEX);
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::checkpoint(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                EngineError::checkpoint(&index, "field `weight_map` missing or not an object")
            })?;
        let mut shards: Vec<PathBuf> = map
            .values()
            .map(|f| {
                let name = f
                    .as_str()
                    .filter(|s| !s.contains('/') && !s.contains(".."))
                    .ok_or_else(|| {
                        EngineError::checkpoint(
                            &index,
                            format!("`weight_map` names an invalid shard file {f}"),
                        )
                    })?;
                Ok(dir.join(name))
            })
            .collect::<Result<_>>()?;
        shards.sort();
        shards.dedup();
        shards
    } else {
        return Err(EngineError::checkpoint(
            dir,
            format!("neither {WEIGHTS} nor {INDEX} found"),
        ));
    };
    let mut out = BTreeMap::new();
    for f in files {
        if !f.is_file() {
            return Err(EngineError::checkpoint(
                &f,
                "shard listed in the index is missing",
            ));
        }
        let tensors = candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| {
            EngineError::checkpoint(&f, format!("not a readable safetensors file: {e}"))
        })?;
        for (name, t) in tensors {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // recomputed from the config
            }
            if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                return Err(EngineError::checkpoint(
                    &f,
                    format!("tensor `{name}` has unsupported dtype {:?}", t.dtype()),
                ));
            }
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Load a model (causal LM or reward model, as the config says).
pub fn load_model(dir: &Path, device: &Device) -> Result<Llama> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG))?;
    let tensors = load_tensors(dir)?;
    let expected = crate::model::param_shapes(&config);
    for name in tensors.keys() {
        if !expected.contains_key(name) && !(config.tie_word_embeddings && name == "lm_head.weight")
        {
            return Err(EngineError::checkpoint(
                dir,
                format!("unexpected tensor `{name}` for this config"),
            ));
        }
    }
    Llama::from_tensors(config, tensors, device)
        .map_err(|e| EngineError::checkpoint(dir, e.to_string()))
}

/// Load a checkpoint's backbone as a reward model, adding a fresh score head
/// (std 0.02, seeded) when it has none; an LM head is dropped.
pub fn load_as_reward_model(dir: &Path, device: &Device, seed: u64) -> Result<Llama> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG))?;
    let mut tensors = load_tensors(dir)?;
    tensors.remove("lm_head.weight");
    if !tensors.contains_key("score.weight") {
        let mut rng = crate::rng::Rng::new(seed);
        let h = config.hidden_size;
        let w: Vec<f32> = (0..h).map(|_| 0.02 * rng.normal()).collect();
        tensors.insert(
            "score.weight".into(),
            Tensor::from_vec(w, (1, h), &Device::Cpu)?,
        );
    }
    Llama::from_tensors(config.as_reward_model(), tensors, device)
        .map_err(|e| EngineError::checkpoint(dir, e.to_string()))
}

pub fn load_chat(dir: &Path) -> Result<ChatFormat> {
    ChatFormat::from_file(&dir.join(TOKENIZER))
}

fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match dtype {
        DType::BF16 => t
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

/// Write named tensors as one safetensors file in `dtype`.
pub fn save_tensors(tensors: &BTreeMap<String, Tensor>, dtype: DType, path: &Path) -> Result<()> {
    let st_dtype = match dtype {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::F32,
    };
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        data.push((name.clone(), t.dims().to_vec(), tensor_bytes(t, dtype)?));
    }
    let views = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| EngineError::checkpoint(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| EngineError::checkpoint(path, e.to_string()))
}

pub fn dtype_of(config: &LlamaConfig) -> DType {
    match config.dtype.as_str() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => DType::F32,
    }
}

/// Save a model as a Hugging Face directory; `tokenizer` is copied beside it.
pub fn save_model(model: &Llama, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let config_path = dir.join(CONFIG);
    let text = serde_json::to_string_pretty(&model.config.to_hf_json()).expect("config serializes");
    std::fs::write(&config_path, text).map_err(|e| EngineError::io(&config_path, e))?;
    let tensors: BTreeMap<String, Tensor> = model
        .params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    save_tensors(&tensors, dtype_of(&model.config), &dir.join(WEIGHTS))?;
    if let Some(src) = tokenizer {
        let dst = dir.join(TOKENIZER);
        if src != dst {
            std::fs::copy(src, &dst).map_err(|e| EngineError::io(src, e))?;
        }
    }
    Ok(())
}

/// A short description of a checkpoint: parameter count and shapes.
pub fn describe(dir: &Path) -> Result<serde_json::Value> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG))?;
    let tensors = load_tensors(dir)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let shapes: BTreeMap<&String, &[usize]> = tensors.iter().map(|(n, t)| (n, t.dims())).collect();
    Ok(serde_json::json!({
        "kind": if config.num_labels == 1 { "reward_model" } else { "causal_lm" },
        "parameters": params, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size, "dtype": config.dtype, "shapes": shapes,
    }))
}
