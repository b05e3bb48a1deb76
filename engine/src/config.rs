//! Model configuration as plain data, read from a Hugging Face `config.json`.
//!
//! The Llama family as transformers defines it: `LlamaForCausalLM` with
//! everything `LlamaConfig` allows (attention and MLP biases, a `head_dim`
//! of its own, RoPE scaling of types default, linear, dynamic, llama3 and
//! yarn, tied or untied embeddings), `MistralForCausalLM` (the same network;
//! its sliding window must cover the sequence) and `Qwen2ForCausalLM`
//! (Llama with q/k/v biases). Each as a causal LM or, `...ForSequenceClassification`
//! with one label, a reward model. Anything else is refused naming the field.
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

/// RoPE frequency scaling, as transformers' `rope_type`s compute it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Llama3(Llama3RopeScaling),
    /// Positions divided by `factor` (inverse frequencies, equivalently).
    Linear {
        factor: f64,
    },
    /// NTK scaling past `max_position_embeddings`; below it, the default.
    Dynamic {
        factor: f64,
    },
    /// YaRN: interpolation ramped by dimension, cos/sin scaled by the
    /// attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

impl RopeScaling {
    pub fn factor(&self) -> f64 {
        match self {
            RopeScaling::Llama3(s) => s.factor,
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Yarn { factor, .. } => *factor,
        }
    }

    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Llama3(_) => "llama3",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }
}

/// Which of transformers' model classes a checkpoint is: the same network,
/// told apart by where biases sit and what the config file says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    #[default]
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Mistral, Arch::Qwen2];

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// The class name prefix (`LlamaFor...`, `MistralFor...`, `Qwen2For...`).
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "Llama",
            Arch::Mistral => "Mistral",
            Arch::Qwen2 => "Qwen2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which transformers class (exports keep it).
    #[serde(default)]
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// "float32" or "bfloat16": the dtype checkpoints are saved in.
    pub dtype: String,
    /// 1 for a reward model (LlamaForSequenceClassification), else 0.
    pub num_labels: usize,
    /// Biases on q/k/v/o (`attention_bias`; Qwen2 has them on q/k/v only).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down (`mlp_bias`).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's (or Qwen2's, when used) sliding window: attention spans at
    /// most this many positions. herd computes full attention, so sequences
    /// must fit inside it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
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

/// The class a config names (`architectures`, else `model_type`), and
/// whether it is a reward model (`...ForSequenceClassification`).
fn arch_of(v: &Value, file: &str) -> Result<(Arch, bool)> {
    let model_type = field(v, "model_type").and_then(|m| m.as_str());
    let by_type = match model_type {
        None => None,
        Some(mt) => Some(
            Arch::ALL
                .into_iter()
                .find(|a| a.model_type() == mt)
                .ok_or_else(|| {
                    EngineError::config(
                file,
                "model_type",
                format!("{mt:?} is not a Llama-family model herd computes (llama, mistral, qwen2)"),
            )
                })?,
        ),
    };
    let mut found: Option<(Arch, bool)> = None;
    if let Some(list) = field(v, "architectures").and_then(|a| a.as_array()) {
        for name in list.iter().filter_map(|x| x.as_str()) {
            let hit = Arch::ALL.into_iter().find_map(|a| {
                if name == format!("{}ForCausalLM", a.class()) {
                    Some((a, false))
                } else if name == format!("{}ForSequenceClassification", a.class()) {
                    Some((a, true))
                } else {
                    None
                }
            });
            match hit {
                Some(h) => found = Some(h),
                None => {
                    return Err(EngineError::config(
                        file,
                        "architectures",
                        format!("{name:?} is not a class herd computes (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, or their ...ForSequenceClassification)"),
                    ))
                }
            }
        }
    }
    match (by_type, found) {
        (Some(t), Some((a, _))) if t != a => Err(EngineError::config(
            file,
            "architectures",
            format!(
                "names a {} class, but model_type is {:?}",
                a.class(),
                t.model_type()
            ),
        )),
        (_, Some(f)) => Ok(f),
        (Some(t), None) => Ok((t, false)),
        (None, None) => Ok((Arch::Llama, false)),
    }
}

/// A `rope_scaling` / `rope_parameters` object: None for the default.
fn rope_scaling_of(s: &Value, file: &str) -> Result<Option<RopeScaling>> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let need = |name: &str| -> Result<f64> {
        opt_f64(s, name, file)?
            .ok_or_else(|| EngineError::config(file, &format!("rope_scaling.{name}"), "missing"))
    };
    Ok(match ty {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: req_usize(
                s,
                "original_max_position_embeddings",
                file,
            )?,
        })),
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "dynamic" => Some(RopeScaling::Dynamic {
            factor: need("factor")?,
        }),
        "yarn" => {
            if opt_f64(s, "partial_rotary_factor", file)?.is_some_and(|f| f != 1.0) {
                return Err(EngineError::config(
                    file,
                    "rope_scaling.partial_rotary_factor",
                    "only 1.0 (RoPE over the whole head) is computed",
                ));
            }
            Some(RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: req_usize(
                    s,
                    "original_max_position_embeddings",
                    file,
                )?,
                attention_factor: opt_f64(s, "attention_factor", file)?,
                beta_fast: opt_f64(s, "beta_fast", file)?.unwrap_or(32.0),
                beta_slow: opt_f64(s, "beta_slow", file)?.unwrap_or(1.0),
                mscale: opt_f64(s, "mscale", file)?,
                mscale_all_dim: opt_f64(s, "mscale_all_dim", file)?,
                truncate: s.get("truncate").and_then(|t| t.as_bool()).unwrap_or(true),
            })
        }
        other => {
            return Err(EngineError::config(
                file,
                "rope_scaling.rope_type",
                format!(
                    "{other:?} is not computed by herd (default, linear, dynamic, llama3, yarn)"
                ),
            ))
        }
    })
}

/// The attention window in force: Mistral's `sliding_window`, or Qwen2's
/// when `use_sliding_window` (or a `sliding_attention` layer) turns it on.
fn sliding_window_of(v: &Value, arch: Arch, file: &str) -> Result<Option<usize>> {
    let window = match field(v, "sliding_window") {
        None => return Ok(None),
        Some(_) => req_usize(v, "sliding_window", file)?,
    };
    let used = match arch {
        Arch::Mistral => true,
        Arch::Qwen2 => {
            field(v, "use_sliding_window")
                .and_then(|b| b.as_bool())
                .unwrap_or(false)
                || field(v, "layer_types")
                    .and_then(|l| l.as_array())
                    .is_some_and(|l| l.iter().any(|t| t.as_str() == Some("sliding_attention")))
        }
        Arch::Llama => false,
    };
    Ok(used.then_some(window))
}

impl LlamaConfig {
    /// Whether block projection `proj` (q_proj, ..., down_proj) has a bias.
    pub fn has_bias(&self, proj: &str) -> bool {
        match proj {
            "q_proj" | "k_proj" | "v_proj" => self.attention_bias,
            "o_proj" => self.attention_bias && self.arch == Arch::Llama,
            _ => self.mlp_bias,
        }
    }

    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let (arch, is_rm) = arch_of(v, file)?;
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
            Some(sc) => rope_scaling_of(sc, file)?,
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
        let mut cfg = LlamaConfig {
            arch,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
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
        let flag = |name: &str| -> Result<bool> {
            match field(v, name) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(EngineError::config(
                    file,
                    name,
                    format!("expected true or false, got {x}"),
                )),
            }
        };
        cfg.attention_bias = match arch {
            Arch::Qwen2 => true, // q/k/v always (see has_bias)
            Arch::Mistral => false,
            Arch::Llama => flag("attention_bias")?,
        };
        cfg.mlp_bias = arch == Arch::Llama && flag("mlp_bias")?;
        cfg.sliding_window = sliding_window_of(v, arch, file)?;
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

    /// A config.json that transformers reads (both old and new key
    /// spellings), of the source's class.
    pub fn to_hf_json(&self) -> Value {
        let mut rope_parameters = match &self.rope_scaling {
            None => serde_json::json!({"rope_type": "default"}),
            Some(RopeScaling::Llama3(s)) => serde_json::json!({
                "rope_type": "llama3", "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}),
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor }) => {
                serde_json::json!({"rope_type": "dynamic", "factor": factor})
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
                let mut y = serde_json::json!({"rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate});
                for (k, x) in [
                    ("attention_factor", attention_factor),
                    ("mscale", mscale),
                    ("mscale_all_dim", mscale_all_dim),
                ] {
                    if let Some(x) = x {
                        y[k] = (*x).into();
                    }
                }
                y
            }
        };
        rope_parameters["rope_theta"] = self.rope_theta.into();
        let rope_scaling = self.rope_scaling.as_ref().map(|_| rope_parameters.clone());
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        let head = if self.num_labels == 1 {
            "ForSequenceClassification"
        } else {
            "ForCausalLM"
        };
        let mut v = serde_json::json!({
            "architectures": [format!("{}{head}", self.arch.class())],
            "model_type": self.arch.model_type(),
            "hidden_act": "silu",
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
        match self.arch {
            Arch::Llama => {
                v["attention_bias"] = self.attention_bias.into();
                v["mlp_bias"] = self.mlp_bias.into();
            }
            Arch::Mistral => v["sliding_window"] = self.sliding_window.into(),
            Arch::Qwen2 => {
                v["use_sliding_window"] = self.sliding_window.is_some().into();
                v["sliding_window"] = self.sliding_window.into();
            }
        }
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
