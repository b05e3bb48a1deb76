//! Model configuration as plain data, read from a Hugging Face `config.json`.
//!
//! Accepts both spellings in the wild: the older top-level `rope_theta`,
//! `rope_scaling` and `torch_dtype`, and the newer `rope_parameters` and
//! `dtype`. Anything inconsistent is an error naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Llama 3 RoPE frequency scaling (`rope_type: llama3`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// "float32" or "bfloat16": the dtype checkpoints are saved in.
    pub dtype: String,
    /// 1 for a reward model (LlamaForSequenceClassification), else 0.
    pub num_labels: usize,
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, name: &str, file: &str) -> Result<usize> {
    let x = field(v, name).ok_or_else(|| EngineError::config(file, name, "missing"))?;
    x.as_u64()
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            EngineError::config(file, name, format!("expected a positive integer, got {x}"))
        })
}

fn opt_f64(v: &Value, name: &str, file: &str) -> Result<Option<f64>> {
    match field(v, name) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .map(Some)
            .ok_or_else(|| {
                EngineError::config(file, name, format!("expected a positive number, got {x}"))
            }),
    }
}

fn token_ids(v: &Value, name: &str, file: &str) -> Result<Vec<u32>> {
    match field(v, name) {
        None => Ok(vec![]),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| vec![n as u32])
            .ok_or_else(|| EngineError::config(file, name, "expected a token id")),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| EngineError::config(file, name, "expected token ids"))
            })
            .collect(),
        Some(other) => Err(EngineError::config(
            file,
            name,
            format!("expected a token id or a list, got {other}"),
        )),
    }
}

impl LlamaConfig {
    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        if let Some(mt) = field(v, "model_type").and_then(|m| m.as_str()) {
            if mt != "llama" {
                return Err(EngineError::config(
                    file,
                    "model_type",
                    format!("expected \"llama\", got {mt:?}"),
                ));
            }
        }
        let hidden_size = req_usize(v, "hidden_size", file)?;
        let num_attention_heads = req_usize(v, "num_attention_heads", file)?;
        let num_key_value_heads = match field(v, "num_key_value_heads") {
            None => num_attention_heads,
            Some(_) => req_usize(v, "num_key_value_heads", file)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(EngineError::config(
                file,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match field(v, "head_dim") {
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(EngineError::config(
                        file,
                        "hidden_size",
                        "not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => req_usize(v, "head_dim", file)?,
        };
        if head_dim % 2 != 0 {
            return Err(EngineError::config(
                file,
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head size"),
            ));
        }
        // Newer transformers nest RoPE settings under rope_parameters.
        let rope_params = field(v, "rope_parameters");
        let rope_theta = match rope_params
            .map(|p| opt_f64(p, "rope_theta", file))
            .transpose()?
            .flatten()
        {
            Some(t) => t,
            None => opt_f64(v, "rope_theta", file)?.unwrap_or(10000.0),
        };
        let scaling = match field(v, "rope_scaling") {
            Some(s) => Some(s),
            None => rope_params,
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                match ty {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: opt_f64(s, "factor", file)?.ok_or_else(|| {
                            EngineError::config(file, "rope_scaling.factor", "missing")
                        })?,
                        low_freq_factor: opt_f64(s, "low_freq_factor", file)?.ok_or_else(|| {
                            EngineError::config(file, "rope_scaling.low_freq_factor", "missing")
                        })?,
                        high_freq_factor: opt_f64(s, "high_freq_factor", file)?.ok_or_else(
                            || {
                                EngineError::config(
                                    file,
                                    "rope_scaling.high_freq_factor",
                                    "missing",
                                )
                            },
                        )?,
                        original_max_position_embeddings: req_usize(
                            s,
                            "original_max_position_embeddings",
                            file,
                        )?,
                    }),
                    other => {
                        return Err(EngineError::config(
                            file,
                            "rope_scaling.rope_type",
                            format!("{other:?} is not supported (supported: default, llama3)"),
                        ))
                    }
                }
            }
        };
        let dtype = field(v, "dtype")
            .or_else(|| field(v, "torch_dtype"))
            .and_then(|d| d.as_str())
            .unwrap_or("float32")
            .to_string();
        if !matches!(dtype.as_str(), "float32" | "bfloat16" | "float16") {
            return Err(EngineError::config(
                file,
                "dtype",
                format!("{dtype:?} is not supported (float32, bfloat16, float16)"),
            ));
        }
        let is_rm = field(v, "architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some("LlamaForSequenceClassification"))
            })
            .unwrap_or(false);
        let num_labels = if is_rm {
            field(v, "id2label")
                .and_then(|m| m.as_object())
                .map(|m| m.len())
                .unwrap_or(1)
        } else {
            0
        };
        if is_rm && num_labels != 1 {
            return Err(EngineError::config(
                file,
                "id2label",
                format!("a reward model has one label, found {num_labels}"),
            ));
        }
        let cfg = LlamaConfig {
            vocab_size: req_usize(v, "vocab_size", file)?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size", file)?,
            num_hidden_layers: req_usize(v, "num_hidden_layers", file)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps", file)?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: match field(v, "max_position_embeddings") {
                None => 2048,
                Some(_) => req_usize(v, "max_position_embeddings", file)?,
            },
            tie_word_embeddings: field(v, "tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
            bos_token_id: token_ids(v, "bos_token_id", file)?.first().copied(),
            eos_token_ids: token_ids(v, "eos_token_id", file)?,
            pad_token_id: token_ids(v, "pad_token_id", file)?.first().copied(),
            dtype,
            num_labels,
        };
        for (name, flag) in [
            ("attention_bias", "attention_bias"),
            ("mlp_bias", "mlp_bias"),
        ] {
            if field(v, flag).and_then(|b| b.as_bool()).unwrap_or(false) {
                return Err(EngineError::config(
                    file,
                    name,
                    "biases are not supported (Llama has none)",
                ));
            }
        }
        if let Some(act) = field(v, "hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(EngineError::config(
                    file,
                    "hidden_act",
                    format!("expected \"silu\", got {act:?}"),
                ));
            }
        }
        Ok(cfg)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::config(
                &file,
                "(file)",
                format!("not valid JSON: {e} (line {})", e.line()),
            )
        })?;
        Self::from_json(&v, &file)
    }

    /// A config.json that transformers reads (both old and new key spellings).
    pub fn to_hf_json(&self) -> Value {
        let rope_parameters = match &self.rope_scaling {
            None => serde_json::json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            Some(s) => serde_json::json!({
                "rope_type": "llama3", "rope_theta": self.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}),
        };
        let rope_scaling = self.rope_scaling.as_ref().map(|_| rope_parameters.clone());
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        let mut v = serde_json::json!({
            "architectures": [if self.num_labels == 1 { "LlamaForSequenceClassification" } else { "LlamaForCausalLM" }],
            "model_type": "llama",
            "attention_bias": false, "mlp_bias": false, "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype, "dtype": self.dtype,
        });
        if self.num_labels == 1 {
            v["id2label"] = serde_json::json!({"0": "LABEL_0"});
            v["label2id"] = serde_json::json!({"LABEL_0": 0});
        }
        v
    }

    /// The same backbone as a reward model (one-output score head).
    pub fn as_reward_model(&self) -> Self {
        LlamaConfig {
            num_labels: 1,
            ..self.clone()
        }
    }

    pub fn as_causal_lm(&self) -> Self {
        LlamaConfig {
            num_labels: 0,
            ..self.clone()
        }
    }
}
