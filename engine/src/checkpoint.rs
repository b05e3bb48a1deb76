//! Hugging Face model directories in and out.
//!
//! In: `config.json` (old or new keys), `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, `tokenizer.json`; f32, bf16 or f16 weights,
//! trained in f32. Out: the same layout with Hugging Face tensor names, the
//! weights in the config's dtype, `{"format": "pt"}` metadata so transformers
//! opens it. The bytes written depend only on the weights (sorted names, fixed
//! metadata), which is what makes checkpoints comparable by hash.
//!
//! Everything else in a directory travels with the weights: the tokenizer,
//! `tokenizer_config.json` with its chat template, `special_tokens_map.json`,
//! `generation_config.json` with the stop tokens serving stacks read. A
//! trained model keeps its base's copies (only `config.json` is rewritten;
//! a reward model has no use for a generation config and drops it), so an
//! exported model loads in transformers with its template and stop tokens.

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
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// The weight files of a checkpoint directory: `model.safetensors`, or the
/// shards its index names (sorted, each once).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
    Ok(files)
}

/// Read every tensor of a checkpoint directory (single file or shards).
pub fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for f in weight_files(dir)? {
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

/// A checkpoint's chat format (its tokenizer, template, special tokens).
pub fn load_chat(dir: &Path) -> Result<ChatFormat> {
    ChatFormat::load(dir, None)
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

/// Whether a file of a checkpoint directory holds weights (written anew
/// when a model is saved) rather than something that travels with them.
pub fn is_weight_file(name: &str) -> bool {
    const WEIGHT_EXTENSIONS: [&str; 8] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
    ];
    name.ends_with(".index.json") || WEIGHT_EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// The files of `dir` that travel with the weights: regular files other
/// than weights, `config.json` and hidden files, by name.
pub fn companion_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))? {
        let e = e.map_err(|e| EngineError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Symlinks count (the daemon's cache links blobs), directories not.
        if name.starts_with('.') || name == CONFIG || is_weight_file(&name) || !e.path().is_file() {
            continue;
        }
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

/// Save a model as a Hugging Face directory: `config.json` from the model's
/// config, the weights, and every companion file of `companions_from` (the
/// checkpoint it was trained or built from: tokenizer, its config and chat
/// template, generation config). A reward model drops `generation_config.json`.
pub fn save_model(model: &Llama, dir: &Path, companions_from: Option<&Path>) -> Result<()> {
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
    let Some(src) = companions_from else {
        return Ok(());
    };
    if src == dir {
        return Ok(());
    }
    for f in companion_files(src)? {
        let name = f.file_name().expect("a listed file has a name");
        if model.config.num_labels == 1 && name == GENERATION_CONFIG {
            continue;
        }
        let dst = dir.join(name);
        std::fs::copy(&f, &dst).map_err(|e| EngineError::io(&f, e))?;
    }
    Ok(())
}

/// The tensors a safetensors file declares (name -> dtype, shape), from its
/// header alone: the 8-byte length, the JSON header, and a check that every
/// tensor's bytes lie inside the file.
fn safetensors_header(path: &Path) -> Result<BTreeMap<String, (String, Vec<usize>)>> {
    use std::io::Read;
    let bad = |reason: String| EngineError::checkpoint(path, reason);
    let mut f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| EngineError::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("not a safetensors file: shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 * 1024 * 1024 || 8 + n > file_len {
        return Err(bad(format!(
            "not a safetensors file: header length {n} does not fit the file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| EngineError::io(path, e))?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("safetensors header is not a JSON object: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut out = BTreeMap::new();
    for (name, info) in v {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?").to_string();
        let shape: Option<Vec<usize>> = info["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let end = info["data_offsets"][1].as_u64();
        match (shape, end) {
            (Some(shape), Some(end)) if end <= data_len => {
                out.insert(name, (dtype, shape));
            }
            _ => {
                return Err(bad(format!(
                    "tensor `{name}`: shape or data offsets missing, or past the end of the file"
                )))
            }
        }
    }
    Ok(out)
}

/// Check that a directory is a checkpoint herd can load, without loading
/// its weights: the config parses, the tokenizer gives the chat format, and
/// the safetensors headers declare every tensor the config implies, with
/// its shape and a supported dtype (f32, bf16, f16). Returns `describe`'s
/// summary. What the daemon runs on import: a 8B checkpoint is checked by
/// reading a few kilobytes.
pub fn inspect(dir: &Path) -> Result<serde_json::Value> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG))?;
    let chat = check_chat(dir, &config)?;
    let mut declared = BTreeMap::new();
    for f in weight_files(dir)? {
        if !f.is_file() {
            return Err(EngineError::checkpoint(
                &f,
                "shard listed in the index is missing",
            ));
        }
        for (name, (dtype, shape)) in safetensors_header(&f)? {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // recomputed from the config
            }
            if !matches!(dtype.as_str(), "F32" | "BF16" | "F16") {
                return Err(EngineError::checkpoint(
                    &f,
                    format!("tensor `{name}` has unsupported dtype {dtype}"),
                ));
            }
            declared.insert(name, shape);
        }
    }
    for (name, shape) in crate::model::param_shapes(&config) {
        match declared.get(&name) {
            None => {
                return Err(EngineError::Input(format!("missing tensor `{name}`")));
            }
            Some(have) if *have != shape => {
                return Err(EngineError::Input(format!(
                    "tensor `{name}` has shape {have:?}, the config implies {shape:?}"
                )));
            }
            Some(_) => {}
        }
    }
    let params: usize = declared.values().map(|s| s.iter().product::<usize>()).sum();
    Ok(serde_json::json!({
        "kind": if config.num_labels == 1 { "reward_model" } else { "causal_lm" },
        "architecture": architecture(&config),
        "parameters": params, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size, "dtype": config.dtype, "shapes": declared,
        "chat": chat,
    }))
}

/// The transformers class a config names (`LlamaForCausalLM`, ...).
fn architecture(config: &LlamaConfig) -> String {
    let head = if config.num_labels == 1 {
        "ForSequenceClassification"
    } else {
        "ForCausalLM"
    };
    format!("{}{head}", config.arch.class())
}

/// The chat format a checkpoint will be trained and sampled with, checked
/// the way jobs will use it: the template compiles, renders a conversation
/// and a generation prompt (a template that raises says so here, with its
/// own words and line), its assistant turn is found in the tokens, and every
/// special token id fits the model's vocabulary. A model that ships no
/// template (a base model) is accepted: `chat` is then null, plain-text
/// rows train it, and `chat_format` gives it a template.
fn check_chat(dir: &Path, config: &LlamaConfig) -> Result<serde_json::Value> {
    let chat = match ChatFormat::load(dir, Some((2024, 1, 1))) {
        Ok(c) => c,
        Err(EngineError::Config { field, .. })
            if field == "chat_template" && crate::template::find_in_dir(dir)?.is_none() =>
        {
            // No template at all: only the tokenizer must load.
            let path = dir.join(TOKENIZER);
            tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
            return Ok(serde_json::Value::Null);
        }
        Err(e) => return Err(e),
    };
    for (field, id) in chat.special_id_list() {
        if id as usize >= config.vocab_size {
            let token = chat.tokenizer.id_to_token(id).unwrap_or_default();
            return Err(EngineError::config(
                &dir.join(TOKENIZER_CONFIG).display().to_string(),
                field,
                format!(
                    "token {token:?} has id {id}, past the model's vocab_size {} (config.json): its embedding row does not exist",
                    config.vocab_size
                ),
            ));
        }
    }
    let probe = [
        crate::chat::Message::new("user", "Hello, who are you?"),
        crate::chat::Message::new("assistant", "I am a helpful assistant."),
    ];
    let dialog = chat.encode_dialog(&probe)?;
    if !dialog.target_mask.contains(&1) {
        return Err(EngineError::config(
            &chat.template.origin,
            "chat_template",
            "an assistant turn renders to no trainable tokens",
        ));
    }
    chat.encode_prompt(&probe[..1])?;
    let name = |id: u32| chat.tokenizer.id_to_token(id);
    Ok(serde_json::json!({
        "template": chat.template.origin.rsplit('/').next().unwrap_or_default(),
        "bos": chat.special.bos.and_then(name),
        "eos": chat.special.eos.and_then(name),
        "pad": name(chat.special.pad),
        "stops": chat.stop_ids().into_iter().filter_map(name).collect::<Vec<_>>(),
    }))
}

/// A short description of a checkpoint: parameter count and shapes.
pub fn describe(dir: &Path) -> Result<serde_json::Value> {
    let config = LlamaConfig::from_file(&dir.join(CONFIG))?;
    let tensors = load_tensors(dir)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let shapes: BTreeMap<&String, &[usize]> = tensors.iter().map(|(n, t)| (n, t.dims())).collect();
    Ok(serde_json::json!({
        "kind": if config.num_labels == 1 { "reward_model" } else { "causal_lm" },
        "architecture": architecture(&config),
        "parameters": params, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size, "dtype": config.dtype, "shapes": shapes,
        "chat": check_chat(dir, &config)?,
    }))
}

/// An adapter directory read against the config of the base it adapts:
/// every tensor's name and shape checked; a reward model's adapter also
/// gives its score head.
fn read_adapter(
    dir: &Path,
    base: &LlamaConfig,
    device: &Device,
) -> Result<(crate::lora::Lora, Option<Tensor>)> {
    let config = crate::lora::LoraConfig::from_file(&dir.join(crate::lora::ADAPTER_CONFIG))?;
    let mut tensors = crate::lora::load_tensors(dir)?;
    let bad = |why: String| EngineError::checkpoint(dir, why);
    let score = crate::lora::take_score(&config, &mut tensors, base.hidden_size).map_err(bad)?;
    let lora = crate::lora::Lora::from_tensors(config, base, tensors, device)
        .map_err(|e| bad(e.to_string()))?;
    Ok((lora, score))
}

/// Attach the PEFT adapter in `dir` (adapter_config.json,
/// adapter_model.safetensors) to `model`, checking every tensor's name and
/// shape against the model. A reward model's adapter brings its score head.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<()> {
    let (lora, score) = read_adapter(dir, &model.config, &model.device)?;
    match (score, &model.score) {
        (None, _) => {}
        (Some(t), Some(head)) => head.set(&t.to_dtype(head.dtype())?.to_device(&model.device)?)?,
        (Some(_), None) => {
            return Err(EngineError::checkpoint(
                dir,
                "a reward model's adapter (it saves a score head); load its base as a reward model",
            ))
        }
    }
    model.lora = Some(lora);
    Ok(())
}

/// Attach a fresh adapter (A seeded, B zero: the model is unchanged until it
/// trains). A reward model's adapter carries its score head.
pub fn attach_new_adapter(
    model: &mut Llama,
    mut config: crate::lora::LoraConfig,
    seed: u64,
) -> Result<()> {
    config.score = model.score.is_some();
    let lora = crate::lora::Lora::init(config, &model.config, seed, &model.device)?;
    model.lora = Some(lora);
    Ok(())
}

/// Write `model`'s adapter as a PEFT adapter directory (`base` names the
/// base model in its config), tensors in f32 under PEFT's names; a reward
/// model's score head goes with it.
pub fn save_adapter(model: &Llama, dir: &Path, base: &str) -> Result<()> {
    let lora = model
        .lora
        .as_ref()
        .ok_or_else(|| EngineError::Input("the model has no adapter to save".into()))?;
    let mut config = lora.config.clone();
    config.score = model.score.is_some();
    let mut tensors: BTreeMap<String, Tensor> = lora
        .params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    if let Some(head) = &model.score {
        tensors.insert(
            crate::lora::SCORE_TENSOR.to_string(),
            head.as_tensor().clone(),
        );
    }
    write_adapter(&config, &tensors, dir, base)
}

/// Write an adapter directory as PEFT does: `adapter_config.json` and the
/// tensors, f32, under PEFT's names.
pub fn write_adapter(
    config: &crate::lora::LoraConfig,
    tensors: &BTreeMap<String, Tensor>,
    dir: &Path,
    base: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let path = dir.join(crate::lora::ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config.to_peft_json(base)).expect("serializes");
    std::fs::write(&path, text).map_err(|e| EngineError::io(&path, e))?;
    save_tensors(tensors, DType::F32, &dir.join(crate::lora::ADAPTER_WEIGHTS))
}

/// What an adapter directory is, checked against the config of the base it
/// adapts: every tensor's name and shape (no base weights are read). For
/// import.
pub fn inspect_adapter(dir: &Path, base_config: &Path) -> Result<serde_json::Value> {
    let base = LlamaConfig::from_file(base_config)?;
    let (lora, _) = read_adapter(dir, &base, &Device::Cpu)?;
    let config = &lora.config;
    let parameters: usize = lora.params().iter().map(|(_, v)| v.elem_count()).sum();
    Ok(serde_json::json!({
        "rank": config.rank,
        "alpha": config.alpha,
        "targets": config.targets,
        "dropout": config.dropout,
        "rslora": config.rslora,
        "reward_model": config.score,
        "parameters": parameters,
    }))
}
