//! A checkpoint as one GGUF file, the format llama.cpp, Ollama and
//! LM Studio read: architecture `llama` and the hyperparameter keys
//! llama.cpp reads for it, the tokenizer (byte-level BPE: vocabulary,
//! merges, token types, special ids), the chat template, and the tensors
//! named and laid out as llama.cpp's `convert_hf_to_gguf.py` lays them out,
//! the q and k projections permuted from Hugging Face's rotate-half rows to
//! GGML's interleaved pairs. Weights as f16 or q8_0 (candle's quantizer).
//! Tokenizers: byte-level BPE as GGUF's `gpt2` model (Llama 3), and
//! SentencePiece-style BPE (byte fallback: Llama 2, Mistral) as its `llama`
//! model, with scores that replay the merges in order.
//!
//! Refused with the reason: reward models (a score head has no place in
//! GGUF's `llama`), biases (Qwen2's layout is another architecture), RoPE
//! scalings other than none, linear and Llama 3's, and tokenizers that are
//! not BPE.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::config::{LlamaConfig, RopeScaling};
use crate::{EngineError, Result};

/// A layer's tensors as llama.cpp names them, beside Hugging Face's names.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F16,
    Q8_0,
}

impl std::str::FromStr for GgufDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(GgufDtype::F16),
            "q8_0" => Ok(GgufDtype::Q8_0),
            other => Err(format!("GGUF dtype {other:?}: f16 or q8_0")),
        }
    }
}

fn bad(why: impl Into<String>) -> EngineError {
    EngineError::Input(why.into())
}

/// Hugging Face's q/k rows (each head's first half of rotary dims, then the
/// second) to GGML's (the two halves interleaved), as llama.cpp's converter
/// permutes them. `w`: [heads·head_dim, hidden].
fn permute_rotary(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn quantize(t: &Tensor, dtype: GgufDtype) -> Result<QTensor> {
    let t = t.to_dtype(DType::F32)?;
    // Norms and other vectors stay f32, as llama.cpp keeps them.
    let ggml = match (t.rank(), dtype) {
        (1, _) => GgmlDType::F32,
        (_, GgufDtype::F16) => GgmlDType::F16,
        (_, GgufDtype::Q8_0) if t.dims()[t.rank() - 1] % 32 == 0 => GgmlDType::Q8_0,
        // A row not a multiple of q8_0's 32-value blocks stays f16.
        (_, GgufDtype::Q8_0) => GgmlDType::F16,
    };
    Ok(QTensor::quantize(&t, ggml)?)
}

/// Write the checkpoint in `dir` (a Hugging Face directory) to `out`.
pub fn write(dir: &Path, out: &Path, dtype: GgufDtype) -> Result<()> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    if config.num_labels > 0 {
        return Err(bad(
            "a reward model (a score head, LlamaForSequenceClassification) has no GGUF `llama` form; export it as safetensors",
        ));
    }
    if config.attention_bias || config.mlp_bias {
        return Err(bad(format!(
            "a {} checkpoint with biases is not GGUF's `llama` layout; export it as safetensors",
            config.arch.class()
        )));
    }
    let tensors = crate::checkpoint::load_tensors(dir)?;
    let tokenizer: serde_json::Value = read_json(&dir.join("tokenizer.json"))?;
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json")).ok();
    let template = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| {
            tokenizer_config
                .as_ref()?
                .get("chat_template")?
                .as_str()
                .map(str::to_string)
        });

    let mut meta: Vec<(String, Value)> = vec![];
    let mut put = |k: &str, v: Value| meta.push((k.to_string(), v));
    let u32v = |x: usize| Value::U32(x as u32);
    put("general.architecture", Value::String("llama".into()));
    put(
        "general.name",
        Value::String(
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        ),
    );
    put(
        "general.file_type",
        u32v(if dtype == GgufDtype::F16 { 1 } else { 7 }),
    );
    put("llama.vocab_size", u32v(config.vocab_size));
    put("llama.context_length", u32v(config.max_position_embeddings));
    put("llama.embedding_length", u32v(config.hidden_size));
    put("llama.block_count", u32v(config.num_hidden_layers));
    put("llama.feed_forward_length", u32v(config.intermediate_size));
    put(
        "llama.attention.head_count",
        u32v(config.num_attention_heads),
    );
    put(
        "llama.attention.head_count_kv",
        u32v(config.num_key_value_heads),
    );
    put("llama.attention.key_length", u32v(config.head_dim));
    put("llama.attention.value_length", u32v(config.head_dim));
    put("llama.rope.dimension_count", u32v(config.head_dim));
    put("llama.rope.freq_base", Value::F32(config.rope_theta as f32));
    put(
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(config.rms_norm_eps as f32),
    );
    let mut rope_freqs = None;
    match &config.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            put("llama.rope.scaling.type", Value::String("linear".into()));
            put("llama.rope.scaling.factor", Value::F32(*factor as f32));
        }
        // llama.cpp applies Llama 3's frequency scaling through a
        // `rope_freqs` tensor of per-pair divisors, as its converter writes.
        Some(RopeScaling::Llama3(_)) => {
            let (inv, _) = crate::model::rope_inv_freq(&config);
            let factors: Vec<f32> = inv
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let base = 1.0
                        / config
                            .rope_theta
                            .powf(2.0 * i as f64 / config.head_dim as f64);
                    (base / *f as f64) as f32
                })
                .collect();
            rope_freqs = Some(Tensor::new(factors, &candle_core::Device::Cpu)?);
        }
        Some(other) => {
            return Err(bad(format!(
                "RoPE scaling `{}` has no GGUF form here (none, linear and llama3 do)",
                other.rope_type()
            )))
        }
    }
    for (k, v) in tokenizer_meta(&tokenizer, tokenizer_config.as_ref(), &config)? {
        put(&k, v);
    }
    if let Some(t) = template {
        put("tokenizer.chat_template", Value::String(t));
    }

    // Tensors under llama.cpp's names.
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| bad(format!("{}: no tensor `{name}`", dir.display())))
    };
    // (GGUF name, Hugging Face name), each layer's with `{l}`; the q and k
    // projections are permuted to GGML's rotary layout on the way.
    let mut pairs = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
    )];
    for l in 0..config.num_hidden_layers {
        pairs.extend(
            LAYER_TENSORS
                .iter()
                .map(|(gguf, hf)| (format!("blk.{l}.{gguf}"), format!("model.layers.{l}.{hf}"))),
        );
    }
    pairs.push(("output_norm.weight".into(), "model.norm.weight".into()));
    // Tied embeddings: llama.cpp reuses token_embd when `output` is absent.
    if !config.tie_word_embeddings {
        pairs.push(("output.weight".into(), "lm_head.weight".into()));
    }
    let mut named: Vec<(String, QTensor)> = Vec::with_capacity(pairs.len() + 1);
    for (gguf, hf) in pairs {
        let t = get(&hf)?;
        let t = if gguf.ends_with("attn_q.weight") {
            permute_rotary(t, config.num_attention_heads)?
        } else if gguf.ends_with("attn_k.weight") {
            permute_rotary(t, config.num_key_value_heads)?
        } else {
            t.clone()
        };
        named.push((gguf, quantize(&t, dtype)?));
    }
    if let Some(f) = rope_freqs {
        named.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&f, GgmlDType::F32)?,
        ));
    }

    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let partial = out.with_extension("gguf.partial");
    let io = |e| EngineError::io(out, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    let file = f.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&partial, out).map_err(io)?;
    Ok(())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
}

/// The tokenizer as GGUF's `gpt2` (byte-level BPE) or `llama`
/// (SentencePiece-style) model: every id's token
/// up to the model's vocabulary size (ids past the tokenizer are padding,
/// typed unused), merges, types (1 normal, 3 control for special added
/// tokens, 4 user-defined for other added ones, 5 unused) and special ids.
fn tokenizer_meta(
    tok: &serde_json::Value,
    tokenizer_config: Option<&serde_json::Value>,
    config: &LlamaConfig,
) -> Result<Vec<(String, Value)>> {
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "a {} tokenizer has no GGUF form here (BPE, byte-level or SentencePiece-style, does)",
            model["type"]
        )));
    }
    // SentencePiece-style (Llama 2, Mistral): byte fallback, `▁` for spaces.
    let sentencepiece = model["byte_fallback"] == true;
    let mut tokens: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("tokenizer.json: a vocabulary id is not a number"))?;
        tokens.insert(id as usize, (t.clone(), 1));
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let kind = if a["special"] == true { 3 } else { 4 };
        tokens.insert(id as usize, (content.to_string(), kind));
    }
    let n = config
        .vocab_size
        .max(tokens.keys().last().map_or(0, |k| k + 1));
    // SentencePiece's byte pieces (<0x0A>) are typed 6, its unknown 2.
    if sentencepiece {
        let unk = model["unk_token"].as_str();
        for (t, kind) in tokens.values_mut() {
            if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                *kind = 6;
            } else if Some(t.as_str()) == unk {
                *kind = 2;
            }
        }
    }
    let (mut list, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for id in 0..n {
        let (t, kind) = tokens
            .get(&id)
            .cloned()
            .unwrap_or_else(|| (format!("[PAD{id}]"), 5));
        list.push(Value::String(t));
        types.push(Value::I32(kind));
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(pair) => Value::String(
                pair.iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            other => Value::String(other.to_string()),
        })
        .collect();
    let mut meta = vec![];
    if sentencepiece {
        // llama.cpp merges SentencePiece pieces greedily by score: a merged
        // piece scores minus its merge's rank, so earlier merges win, as in
        // BPE; other pieces score 0.
        let mut scores = vec![0f32; n];
        let index: BTreeMap<&str, usize> = tokens
            .iter()
            .map(|(id, (t, _))| (t.as_str(), *id))
            .collect();
        for (rank, m) in merges.iter().enumerate() {
            if let Value::String(m) = m {
                if let Some(&id) = index.get(m.replacen(' ', "", 1).as_str()) {
                    if scores[id] == 0.0 {
                        scores[id] = -(rank as f32) - 1.0;
                    }
                }
            }
        }
        meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        meta.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
        meta.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(true)));
        if let Some(unk) = model["unk_token"].as_str().and_then(|u| index.get(u)) {
            meta.push((
                "tokenizer.ggml.unknown_token_id".into(),
                Value::U32(*unk as u32),
            ));
        }
    } else {
        meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        meta.push((
            "tokenizer.ggml.pre".into(),
            Value::String(bpe_pre(&tok["pre_tokenizer"])?.into()),
        ));
    }
    meta.push(("tokenizer.ggml.tokens".into(), Value::Array(list)));
    meta.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
    meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    if let Some(b) = config.bos_token_id {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = config.eos_token_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    if let Some(p) = config.pad_token_id {
        meta.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(adds_bos(tok, tokenizer_config, config)),
    ));
    Ok(meta)
}

/// The text splits llama.cpp knows by name (`tokenizer.ggml.pre`), as
/// tokenizer.json writes their regex before byte-level BPE.
const NAMED_SPLITS: [(&str, &str); 2] = [
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
];

/// llama.cpp's name for how a byte-level BPE tokenizer splits text before
/// merging, read from tokenizer.json's pre-tokenizer: GPT-2's regex
/// (`gpt-2`), a named regex then bytes (Llama 3's `llama-bpe`, `qwen2`), or
/// digits one by one then GPT-2's regex (`smollm`). Any other split is
/// refused: written under a wrong name, text would tokenize differently in
/// every runtime that reads the file.
fn bpe_pre(pre: &serde_json::Value) -> Result<&'static str> {
    let byte_level = |p: &serde_json::Value, regex: bool| {
        p["type"] == "ByteLevel" && (p["use_regex"] != false) == regex
    };
    if byte_level(pre, true) {
        return Ok("gpt-2");
    }
    if let Some([first, then]) = pre["pretokenizers"].as_array().map(Vec::as_slice) {
        if first["type"] == "Split" && first["behavior"] == "Isolated" && byte_level(then, false) {
            let regex = first["pattern"]["Regex"].as_str();
            if let Some((name, _)) = NAMED_SPLITS.iter().find(|(_, r)| Some(*r) == regex) {
                return Ok(name);
            }
        }
        if first["type"] == "Digits" && first["individual_digits"] == true && byte_level(then, true)
        {
            return Ok("smollm");
        }
    }
    Err(bad(format!(
        "tokenizer.json's pre-tokenizer {pre} is not a split llama.cpp knows by name (GPT-2's, Llama 3's, Qwen 2's, SmolLM's); in GGUF its text would tokenize differently"
    )))
}

/// Whether the source tokenizer puts BOS before a text, so that runtimes
/// reading the GGUF do too: its tokenizer_config.json's `add_bos_token`,
/// else whether its post-processor's template starts with the BOS token.
fn adds_bos(
    tok: &serde_json::Value,
    tokenizer_config: Option<&serde_json::Value>,
    config: &LlamaConfig,
) -> bool {
    if let Some(b) = tokenizer_config.and_then(|c| c["add_bos_token"].as_bool()) {
        return b;
    }
    let Some(bos) = config.bos_token_id else {
        return false;
    };
    // The template, alone or among a sequence's processors (Llama 3.1).
    let post = &tok["post_processor"];
    let template = std::iter::once(post)
        .chain(post["processors"].as_array().into_iter().flatten())
        .find(|p| p["type"] == "TemplateProcessing");
    let Some(first) = template.map(|t| &t["single"][0]["SpecialToken"]["id"]) else {
        return false;
    };
    tok["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["id"] == bos && a["content"] == *first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_byte_level_split_gets_llama_cpps_name_or_a_refusal() {
        use serde_json::json;
        let bytes = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": regex});
        let split = |r: &str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
        assert_eq!(bpe_pre(&bytes(true)).unwrap(), "gpt-2");
        let llama3 =
            json!({"type": "Sequence", "pretokenizers": [split(NAMED_SPLITS[0].1), bytes(false)]});
        assert_eq!(bpe_pre(&llama3).unwrap(), "llama-bpe");
        let qwen2 =
            json!({"type": "Sequence", "pretokenizers": [split(NAMED_SPLITS[1].1), bytes(false)]});
        assert_eq!(bpe_pre(&qwen2).unwrap(), "qwen2");
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bytes(true)]});
        assert_eq!(bpe_pre(&smollm).unwrap(), "smollm");
        for other in [
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}+|\s+"), bytes(false)]}),
            bytes(false),
            json!({"type": "Whitespace"}),
            serde_json::Value::Null,
        ] {
            let err = bpe_pre(&other).unwrap_err().to_string();
            assert!(err.contains("tokenize differently"), "{err}");
        }
    }

    #[test]
    fn bos_is_added_as_the_source_tokenizer_adds_it() {
        use serde_json::json;
        let mut config = LlamaConfig::from_json(
            &json!({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "vocab_size": 4, "bos_token_id": 1}),
            "config.json",
        )
        .unwrap();
        let added = json!([{"id": 1, "content": "<s>"}]);
        let template = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]});
        let plain = json!({"added_tokens": added, "post_processor": {"type": "ByteLevel"}});
        assert!(!adds_bos(&plain, None, &config));
        let alone = json!({"added_tokens": added, "post_processor": template});
        assert!(adds_bos(&alone, None, &config));
        let in_sequence = json!({"added_tokens": added,
            "post_processor": {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}});
        assert!(adds_bos(&in_sequence, None, &config));
        // tokenizer_config.json's word wins.
        assert!(!adds_bos(
            &alone,
            Some(&json!({"add_bos_token": false})),
            &config
        ));
        assert!(adds_bos(
            &plain,
            Some(&json!({"add_bos_token": true})),
            &config
        ));
        config.bos_token_id = None;
        assert!(!adds_bos(&alone, None, &config));
    }

    #[test]
    fn rotary_rows_are_interleaved_per_head() {
        // One head, head_dim 4: rows [a0, a1, b0, b1] -> [a0, b0, a1, b1].
        let w = Tensor::new(&[[0f32], [1.], [2.], [3.]], &candle_core::Device::Cpu).unwrap();
        let p: Vec<f32> = permute_rotary(&w, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p, [0., 2., 1., 3.]);
    }
}
