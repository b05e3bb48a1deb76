//! Giving a model a chat format it does not ship: a template by name
//! (`llama3`, `chatml`) or a Jinja text, and, where the template's special
//! tokens are missing from the vocabulary, the tokens added and the
//! embeddings grown (TRL's `setup_chat_format`).
//!
//! Why its own module: it is the one place herd changes a tokenizer and a
//! vocabulary. New rows follow transformers' `resize_token_embeddings(...,
//! mean_resizing=True)`: drawn from a normal with the old rows' mean and
//! 1e-9 times their covariance (the mean alone where that covariance is not
//! positive definite), for the embedding and an untied LM head alike; the
//! draw comes from herd's seeded RNG, so a seed gives the same checkpoint.
//! A vocabulary already padded past the tokenizer (Llama 3's reserved
//! rows, Qwen's padding) is never shrunk: tokens that fit take existing rows.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use tokenizers::{AddedToken, Tokenizer};

use crate::chat::BuiltinTemplate;
use crate::checkpoint::{
    self, CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG,
};
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};

/// The template to give: one herd carries, or a Jinja text.
pub enum TemplateChoice {
    Builtin(BuiltinTemplate),
    Jinja(String),
}

/// Write `src` with the chosen template into `out` (a new checkpoint
/// directory); returns what changed, for the record.
pub fn setup_chat_format(
    src: &Path,
    out: &Path,
    choice: &TemplateChoice,
    add_special_tokens: bool,
    seed: u64,
) -> Result<Value> {
    let tok_path = src.join(TOKENIZER);
    let mut tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let (name, source, builtin) = match choice {
        TemplateChoice::Builtin(b) => (b.name.to_string(), b.source.to_string(), Some(*b)),
        TemplateChoice::Jinja(text) => {
            if add_special_tokens {
                return Err(EngineError::Input(
                    "add_special_tokens adds a built-in template's tokens; a Jinja template's special tokens must already be in the vocabulary".into(),
                ));
            }
            ("custom".to_string(), text.clone(), None)
        }
    };
    // The template must compile before anything is written.
    crate::template::ChatTemplate::new(&source, &format!("template `{name}`"), None)?;
    let missing: Vec<&str> = builtin
        .iter()
        .flat_map(|b| b.tokens.iter().copied())
        .filter(|t| tokenizer.token_to_id(t).is_none())
        .collect();
    if !missing.is_empty() && !add_special_tokens {
        return Err(EngineError::Input(format!(
            "the {name} template needs {}, which the vocabulary of {} lacks; set add_special_tokens (the embeddings grow to hold them)",
            missing.join(", "),
            tok_path.display()
        )));
    }
    let added: Vec<AddedToken> = missing
        .iter()
        .map(|t| AddedToken::from(*t, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&added);

    let mut config = LlamaConfig::from_file(&src.join(CONFIG))?;
    let old_vocab = config.vocab_size;
    let new_vocab = old_vocab.max(tokenizer.get_vocab_size(true));
    let mut tensors = checkpoint::load_tensors(src)?;
    if new_vocab > old_vocab {
        let mut rng = crate::rng::Rng::new(seed);
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            if let Some(w) = tensors.remove(name) {
                tensors.insert(name.to_string(), grow_rows(&w, new_vocab, &mut rng)?);
            }
        }
        config.vocab_size = new_vocab;
    }
    let id = |t: &str| tokenizer.token_to_id(t);
    let (bos, eos, pad) = match builtin {
        Some(b) => (
            b.bos.filter(|t| id(t).is_some()),
            Some(b.eos),
            b.pad.filter(|t| id(t).is_some()).or(Some(b.eos)),
        ),
        None => (None, None, None),
    };
    if let Some(eos) = eos {
        let eos_id = id(eos).expect("in the vocabulary or added");
        config.eos_token_ids.retain(|x| *x != eos_id);
        config.eos_token_ids.insert(0, eos_id);
        config.pad_token_id = pad.and_then(id);
        if let Some(b) = bos.and_then(id) {
            config.bos_token_id = Some(b);
        }
    }
    let model =
        crate::model::Llama::from_tensors_dtype(config.clone(), tensors, &Device::Cpu, DType::F32)?;
    checkpoint::save_model(&model, out, Some(src))?;

    // The tokenizer and its configuration files, rewritten.
    let tok_out = out.join(TOKENIZER);
    tokenizer
        .save(&tok_out, false)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tok_out.display())))?;
    for stale in ["chat_template.json", "chat_template.jinja"] {
        let _ = std::fs::remove_file(out.join(stale));
    }
    std::fs::write(out.join("chat_template.jinja"), &source)
        .map_err(|e| EngineError::io(&out.join("chat_template.jinja"), e))?;
    let mut tc = read_or_empty(&src.join(TOKENIZER_CONFIG))?;
    tc.as_object_mut()
        .expect("an object")
        .remove("chat_template");
    let mut map = read_or_empty(&src.join(SPECIAL_TOKENS_MAP))?;
    for (field, token) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad)] {
        if let Some(t) = token {
            tc[field] = t.into();
            map[field] = t.into();
        }
    }
    if !added.is_empty() {
        let decoder = tc
            .as_object_mut()
            .expect("an object")
            .entry("added_tokens_decoder")
            .or_insert_with(|| json!({}));
        for t in &missing {
            decoder[id(t).expect("added").to_string()] = json!({"content": t, "lstrip": false,
                "normalized": false, "rstrip": false, "single_word": false, "special": true});
        }
    }
    write_json(&out.join(TOKENIZER_CONFIG), &tc)?;
    if src.join(SPECIAL_TOKENS_MAP).is_file() || builtin.is_some() {
        write_json(&out.join(SPECIAL_TOKENS_MAP), &map)?;
    }
    if let Some(eos) = eos.and_then(id) {
        let mut g = read_or_empty(&src.join(GENERATION_CONFIG))?;
        let mut stops: Vec<u64> = vec![eos as u64];
        match g.get("eos_token_id") {
            Some(Value::Array(a)) => stops.extend(a.iter().filter_map(|x| x.as_u64())),
            Some(x) => stops.extend(x.as_u64()),
            None => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        stops.retain(|x| seen.insert(*x));
        g["eos_token_id"] = json!(stops);
        if let Some(p) = pad.and_then(id) {
            g["pad_token_id"] = p.into();
        }
        if let Some(b) = bos.and_then(id) {
            g["bos_token_id"] = b.into();
        }
        write_json(&out.join(GENERATION_CONFIG), &g)?;
    }
    // The result must load as any checkpoint does.
    crate::checkpoint::inspect(out)?;
    Ok(json!({
        "template": name,
        "added_tokens": missing,
        "vocab_size_before": old_vocab,
        "vocab_size": new_vocab,
    }))
}

/// `w` [V, H] grown to [new_v, H]: old rows kept, new rows drawn from
/// N(mean, 1e-9 · cov) of the old rows (the mean where cov is not
/// positive definite), as transformers' mean resizing.
pub fn grow_rows(w: &Tensor, new_v: usize, rng: &mut crate::rng::Rng) -> Result<Tensor> {
    let dtype = w.dtype();
    let (v, h) = w.dims2()?;
    let rows: Vec<Vec<f64>> = w.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mean: Vec<f64> = (0..h)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / v as f64)
        .collect();
    // Covariance of the old rows (biased, as transformers: / V), times 1e-9.
    let mut cov = vec![0.0f64; h * h];
    for r in &rows {
        for i in 0..h {
            let di = r[i] - mean[i];
            for j in 0..=i {
                cov[i * h + j] += di * (r[j] - mean[j]);
            }
        }
    }
    for i in 0..h {
        for j in 0..=i {
            let c = cov[i * h + j] / v as f64 * 1e-9;
            cov[i * h + j] = c;
            cov[j * h + i] = c;
        }
    }
    let chol = cholesky(&cov, h);
    let mut out: Vec<f64> = rows.into_iter().flatten().collect();
    for _ in v..new_v {
        let z: Vec<f64> = (0..h).map(|_| rng.normal() as f64).collect();
        for i in 0..h {
            let noise = match &chol {
                Some(l) => (0..=i).map(|k| l[i * h + k] * z[k]).sum::<f64>(),
                None => 0.0,
            };
            out.push(mean[i] + noise);
        }
    }
    Ok(Tensor::from_vec(out, (new_v, h), &Device::Cpu)?.to_dtype(dtype)?)
}

/// Lower-triangular L with L Lᵀ = a (h x h, row-major); None unless a is
/// positive definite.
fn cholesky(a: &[f64], h: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; h * h];
    for i in 0..h {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * h + k] * l[j * h + k]).sum();
            if i == j {
                let d = a[i * h + i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i * h + j] = d.sqrt();
            } else {
                l[i * h + j] = (a[i * h + j] - s) / l[j * h + j];
            }
        }
    }
    Some(l)
}

fn read_or_empty(path: &Path) -> Result<Value> {
    if path.is_file() {
        crate::template::read_json(path)
    } else {
        Ok(json!({}))
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON serializes");
    std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
}
