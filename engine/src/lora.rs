//! LoRA adapters, as PEFT lays them out and names them.
//!
//! A targeted projection `y = x Wᵀ` becomes `y = x Wᵀ + scale · (x Aᵀ) Bᵀ`
//! with A [r, in], B [out, r] and scale = alpha / r (alpha / √r with
//! rsLoRA). Only A and B train; the base stays frozen, so a DPO reference is
//! the same model with the adapter switched off instead of a second copy.
//!
//! On disk: a PEFT adapter directory, `adapter_config.json` and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{l}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};

/// The projections of a block LoRA can target, with their module paths.
pub const PROJECTIONS: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// What an adapter is: rank, alpha, which projections.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names (`q_proj`, ...), in [`PROJECTIONS`] order.
    pub targets: Vec<&'static str>,
    /// rsLoRA: scale alpha / √rank instead of alpha / rank.
    pub rslora: bool,
    /// Dropout on the adapter's input while training (PEFT's
    /// `lora_dropout`); the base path never drops.
    pub dropout: f64,
    /// The adapter carries a reward model's score head too (PEFT's
    /// `modules_to_save: ["score"]`, a SEQ_CLS adapter).
    pub score: bool,
}

/// PEFT's name for a saved score head (`modules_to_save`).
pub const SCORE_TENSOR: &str = "base_model.model.score.weight";

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Read PEFT's `adapter_config.json`, refusing what herd does not
    /// implement (DoRA, biases, extra trained modules, per-layer patterns)
    /// rather than silently computing something else.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::checkpoint(path, format!("not valid JSON: {e}")))?;
        let bad = |field: &str, why: String| {
            EngineError::checkpoint(path, format!("field `{field}`: {why}"))
        };
        if v.get("peft_type")
            .and_then(|t| t.as_str())
            .unwrap_or("LORA")
            != "LORA"
        {
            return Err(bad("peft_type", "only LORA adapters are supported".into()));
        }
        let rank = v["r"]
            .as_u64()
            .filter(|r| *r > 0)
            .ok_or_else(|| bad("r", "missing or not a positive integer".into()))?
            as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("lora_alpha", "missing or not a number".into()))?;
        for (field, unsupported) in [
            ("use_dora", v["use_dora"].as_bool() == Some(true)),
            (
                "fan_in_fan_out",
                v["fan_in_fan_out"].as_bool() == Some(true),
            ),
            ("bias", v["bias"].as_str().is_some_and(|b| b != "none")),
            (
                "modules_to_save",
                !v["modules_to_save"].is_null() && !saves_only_score(&v["modules_to_save"]),
            ),
            ("layers_to_transform", !v["layers_to_transform"].is_null()),
            (
                "rank_pattern",
                v["rank_pattern"].as_object().is_some_and(|m| !m.is_empty()),
            ),
            (
                "alpha_pattern",
                v["alpha_pattern"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty()),
            ),
        ] {
            if unsupported {
                return Err(bad(field, format!("{} is not supported", v[field])));
            }
        }
        let targets: Vec<&'static str> = match &v["target_modules"] {
            Value::String(s) if s == "all-linear" => PROJECTIONS.iter().map(|p| p.0).collect(),
            Value::Array(a) => {
                let names: Vec<&str> = a.iter().filter_map(|x| x.as_str()).collect();
                if let Some(other) = names
                    .iter()
                    .find(|n| !PROJECTIONS.iter().any(|p| p.0 == **n))
                {
                    return Err(bad(
                        "target_modules",
                        format!("{other:?} is not a Llama projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
                    ));
                }
                PROJECTIONS
                    .iter()
                    .map(|p| p.0)
                    .filter(|p| names.contains(p))
                    .collect()
            }
            other => {
                return Err(bad(
                    "target_modules",
                    format!("expected a list of projection names or \"all-linear\", got {other}"),
                ))
            }
        };
        if targets.is_empty() {
            return Err(bad("target_modules", "no projection targeted".into()));
        }
        let dropout = match &v["lora_dropout"] {
            Value::Null => 0.0,
            d => d
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| {
                    bad(
                        "lora_dropout",
                        format!("expected a number in [0, 1), got {d}"),
                    )
                })?,
        };
        Ok(LoraConfig {
            rank,
            alpha,
            targets,
            rslora: v["use_rslora"].as_bool() == Some(true),
            dropout,
            score: saves_only_score(&v["modules_to_save"]),
        })
    }

    /// PEFT's `adapter_config.json` for this adapter on `base` (a name).
    pub fn to_peft_json(&self, base: &str) -> Value {
        let (task, saves) = if self.score {
            ("SEQ_CLS", json!(["score"]))
        } else {
            ("CAUSAL_LM", Value::Null)
        };
        json!({
            "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "bias": "none",
            "target_modules": self.targets, "use_rslora": self.rslora, "use_dora": false,
            "fan_in_fan_out": false, "modules_to_save": saves, "layers_to_transform": null,
            "inference_mode": true, "init_lora_weights": true,
        })
    }
}

/// `modules_to_save` is exactly the score head (what PEFT saves beside a
/// reward model's adapter).
fn saves_only_score(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(|m| m.as_str() == Some("score")))
}

/// The module a projection sits in (`self_attn` or `mlp`).
pub fn module_of(proj: &str) -> &'static str {
    PROJECTIONS
        .iter()
        .find(|p| p.0 == proj)
        .map(|p| p.1)
        .expect("a known projection")
}

/// PEFT's tensor name for layer `l`'s projection `proj`, matrix "A" or "B".
pub fn tensor_name(l: usize, proj: &str, matrix: &str) -> String {
    let module = module_of(proj);
    format!("base_model.model.model.layers.{l}.{module}.{proj}.lora_{matrix}.weight")
}

/// An adapter attached to a model: A and B per (layer, projection).
pub struct Lora {
    pub config: LoraConfig,
    pub adapters: BTreeMap<(usize, &'static str), (Var, Var)>,
    enabled: AtomicBool,
    /// Dropout masks are drawn only while training, from a seeded stream:
    /// the forward passes of a step run in a fixed order, so a run's masks
    /// are the same on every machine and thread count.
    training: AtomicBool,
    dropout_rng: Mutex<crate::rng::Rng>,
}

impl Lora {
    /// From named tensors (PEFT names), checking every expected one is
    /// there with the shape the base (`base`, its config) implies.
    pub fn from_tensors(
        config: LoraConfig,
        base: &LlamaConfig,
        mut tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut adapters = BTreeMap::new();
        for l in 0..base.num_hidden_layers {
            for proj in &config.targets {
                let (out, inp) = crate::model::projection_shape(base, proj);
                let mut take = |matrix: &str, want: [usize; 2]| -> Result<Var> {
                    let name = tensor_name(l, proj, matrix);
                    let t = tensors.remove(&name).ok_or_else(|| {
                        EngineError::Input(format!("adapter: missing tensor `{name}`"))
                    })?;
                    if t.dims() != want {
                        return Err(EngineError::Input(format!(
                            "adapter: tensor `{name}` has shape {:?}, rank {} and the base imply {want:?}",
                            t.dims(),
                            config.rank
                        )));
                    }
                    Ok(Var::from_tensor(
                        &t.to_dtype(DType::F32)?.to_device(device)?,
                    )?)
                };
                let a = take("A", [config.rank, inp])?;
                let b = take("B", [out, config.rank])?;
                adapters.insert((l, *proj), (a, b));
            }
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(EngineError::Input(format!(
                "adapter: unexpected tensor `{extra}` (layers beyond the base, or a module herd does not adapt)"
            )));
        }
        Ok(Lora {
            config,
            adapters,
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(false),
            dropout_rng: Mutex::new(crate::rng::Rng::new(0)),
        })
    }

    /// A fresh adapter as PEFT initializes one: A Kaiming-uniform (seeded),
    /// B zero, so the model starts exactly at its base.
    pub fn init(
        config: LoraConfig,
        base: &LlamaConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut tensors = BTreeMap::new();
        for l in 0..base.num_hidden_layers {
            for proj in &config.targets {
                let (out, inp) = crate::model::projection_shape(base, proj);
                // kaiming_uniform_(a=√5): bound = 1/√in.
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.rank * inp)
                    .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                    .collect();
                tensors.insert(
                    tensor_name(l, proj, "A"),
                    Tensor::from_vec(a, (config.rank, inp), &Device::Cpu)?,
                );
                tensors.insert(
                    tensor_name(l, proj, "B"),
                    Tensor::zeros((out, config.rank), DType::F32, &Device::Cpu)?,
                );
            }
        }
        Self::from_tensors(config, base, tensors, device)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Switch the adapter off (the model is its base) or on.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }

    /// Training mode (dropout on, masks from `seed`) or not.
    pub fn set_training(&self, on: bool, seed: u64) {
        self.training.store(on, Ordering::Relaxed);
        *self.dropout_rng.lock().expect("dropout rng") = crate::rng::Rng::new(seed);
    }

    /// Where the dropout stream is (activation checkpointing replays a
    /// block's masks from here).
    pub fn dropout_state(&self) -> crate::rng::Rng {
        self.dropout_rng.lock().expect("dropout rng").clone()
    }

    pub fn set_dropout_state(&self, state: crate::rng::Rng) {
        *self.dropout_rng.lock().expect("dropout rng") = state;
    }

    /// The adapter's input: x, or x with inverted dropout while training.
    pub fn dropped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.config.dropout;
        if p == 0.0 || !self.training.load(Ordering::Relaxed) {
            return Ok(x.clone());
        }
        let keep = 1.0 - p as f32;
        let mask: Vec<f32> = {
            let mut rng = self.dropout_rng.lock().expect("dropout rng");
            (0..x.elem_count())
                .map(|_| {
                    if rng.uniform() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }

    /// The trainable parameters, by PEFT name, sorted.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .adapters
            .iter()
            .flat_map(|((l, proj), (a, b))| {
                [
                    (tensor_name(*l, proj, "A"), a.clone()),
                    (tensor_name(*l, proj, "B"), b.clone()),
                ]
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// `scale · B A` for one projection: what merging adds to its weight.
    pub fn delta(&self, l: usize, proj: &'static str) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.adapters.get(&(l, proj)) else {
            return Ok(None);
        };
        Ok(Some(
            (b.as_tensor().matmul(a.as_tensor())? * self.config.scale())?,
        ))
    }
}

/// Take a reward model's score head out of an adapter's tensors, checking
/// it is there exactly when the config says (`modules_to_save`) and is
/// [1, hidden]. Errors say what is wrong, for the caller to place.
pub fn take_score(
    config: &LoraConfig,
    tensors: &mut BTreeMap<String, Tensor>,
    hidden: usize,
) -> std::result::Result<Option<Tensor>, String> {
    match (config.score, tensors.remove(SCORE_TENSOR)) {
        (false, None) => Ok(None),
        (true, Some(t)) if t.dims() == [1, hidden] => Ok(Some(t)),
        (true, Some(t)) => Err(format!(
            "`{SCORE_TENSOR}` has shape {:?}, the base implies [1, {hidden}]",
            t.dims()
        )),
        (true, None) => Err(format!(
            "modules_to_save names the score head but `{SCORE_TENSOR}` is missing"
        )),
        (false, Some(_)) => Err(format!(
            "unexpected tensor `{SCORE_TENSOR}` (modules_to_save does not name the score head)"
        )),
    }
}

/// Read an adapter's tensors (PEFT's safetensors file).
pub fn load_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        EngineError::checkpoint(&path, format!("not a readable safetensors file: {e}"))
    })?;
    Ok(tensors.into_iter().collect())
}
