//! Reading a checkpoint directory's chat format: its tokenizer, its
//! template (or a built-in one), and which ids are BOS, EOS, pad and stops,
//! from the files transformers reads them from.

use std::path::Path;

use tokenizers::Tokenizer;

use super::{BuiltinTemplate, ChatFormat, SpecialIds, LLAMA3};
use crate::error::{EngineError, Result};
use crate::template::{ChatTemplate, RenderVars};

/// A token as `tokenizer_config.json` writes it: a string, or an
/// `AddedToken` object with its `content`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// Where a special token is named: the first of these files that names it.
struct TokenSources {
    /// (file path, parsed JSON) for tokenizer_config.json, special_tokens_map.json.
    files: Vec<(String, serde_json::Value)>,
}

impl TokenSources {
    fn read(dir: &Path) -> Result<Self> {
        let mut files = vec![];
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if path.is_file() {
                files.push((
                    path.display().to_string(),
                    crate::template::read_json(&path)?,
                ));
            }
        }
        Ok(TokenSources { files })
    }

    /// The token a field names, and the file that named it. A field that
    /// is present but null means "none" and stops the search.
    fn named(&self, field: &str) -> Result<Option<(String, String)>> {
        for (file, v) in &self.files {
            match v.get(field) {
                None => continue,
                Some(serde_json::Value::Null) => return Ok(None),
                Some(x) => {
                    return token_text(x)
                        .map(|t| Some((t, file.clone())))
                        .ok_or_else(|| {
                            EngineError::config(file, field, format!("expected a token, got {x}"))
                        })
                }
            }
        }
        Ok(None)
    }

    fn flag(&self, field: &str) -> Option<bool> {
        self.files
            .iter()
            .find_map(|(_, v)| v.get(field).and_then(|b| b.as_bool()))
    }
}

/// `generation_config.json`'s `eos_token_id`: an int or a list.
fn generation_stops(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let v = crate::template::read_json(&path)?;
    let file = path.display().to_string();
    let bad = || {
        EngineError::config(
            &file,
            "eos_token_id",
            "expected a token id or a list of them",
        )
    };
    match v.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|n| n as u32).ok_or_else(bad))
            .collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
    }
}

impl ChatFormat {
    /// A checkpoint directory's chat format: `tokenizer.json`, the chat
    /// template (the directory's own, else herd's Llama 3 format when the
    /// tokenizer has its tokens), special tokens from `tokenizer_config.json`
    /// and `special_tokens_map.json`, stop tokens from
    /// `generation_config.json`. `today` fixes the date templates print.
    pub fn load(dir: &Path, today: Option<(i32, u32, u32)>) -> Result<Self> {
        Self::load_with(dir, &dir.join("tokenizer.json"), None, today)
    }

    /// As `load`, with the tokenizer at `tokenizer_path` (its directory is
    /// where the other files are looked for).
    pub fn from_file(tokenizer_path: &Path) -> Result<Self> {
        let dir = tokenizer_path.parent().unwrap_or(Path::new("."));
        Self::load_with(dir, tokenizer_path, None, None)
    }

    /// As `load`, with a built-in template instead of the directory's own.
    pub fn load_with(
        dir: &Path,
        tokenizer_path: &Path,
        builtin_template: Option<BuiltinTemplate>,
        today: Option<(i32, u32, u32)>,
    ) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(tokenizer_path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let tok_file = tokenizer_path.display().to_string();
        let sources = TokenSources::read(dir)?;
        let (template, builtin) = match builtin_template {
            Some(b) => (ChatTemplate::new(b.source, &format!("herd's built-in {} template", b.name), today)?, Some(b)),
            None => match crate::template::find_in_dir(dir)? {
                Some((source, origin)) => (ChatTemplate::new(&source, &origin, today)?, None),
                None if LLAMA3.tokens.iter().all(|t| tokenizer.token_to_id(t).is_some()) => (
                    ChatTemplate::new(LLAMA3.source, "herd's built-in llama3 template", today)?,
                    Some(LLAMA3),
                ),
                None => {
                    return Err(EngineError::config(
                        &dir.display().to_string(),
                        "chat_template",
                        "this model ships no chat template (none in chat_template.jinja, chat_template.json or tokenizer_config.json) and its tokenizer lacks Llama 3's tokens; import it with `--chat-template llama3|chatml|FILE.jinja`",
                    ))
                }
            },
        };
        if let Some(b) = builtin {
            for t in b.tokens {
                if tokenizer.token_to_id(t).is_none() {
                    return Err(EngineError::Tokenizer(format!(
                        "{tok_file}: the {} template needs the special token {t}, which the vocabulary lacks (import with --add-special-tokens to add it)",
                        b.name
                    )));
                }
            }
        }
        // A token named in a file must exist; a built-in's is used only
        // where the files name none.
        let resolve =
            |field: &str, fallback: Option<&str>| -> Result<Option<(String, u32)>> {
                match sources.named(field)? {
                    Some((text, file)) => match tokenizer.token_to_id(&text) {
                        Some(id) => Ok(Some((text, id))),
                        None => Err(EngineError::config(
                            &file,
                            field,
                            format!("{text:?} is not in the vocabulary of {tok_file}"),
                        )),
                    },
                    None => Ok(fallback
                        .and_then(|t| tokenizer.token_to_id(t).map(|id| (t.to_string(), id)))),
                }
            };
        let (bos, eos, pad, unk) = match builtin {
            // A built-in template brings its own tokens (a tokenizer config
            // written for another format would disagree with it).
            Some(b) => {
                let get = |t: Option<&str>| {
                    t.and_then(|t| tokenizer.token_to_id(t).map(|id| (t.to_string(), id)))
                };
                (
                    get(b.bos),
                    get(Some(b.eos)),
                    get(b.pad),
                    resolve("unk_token", None)?,
                )
            }
            None => (
                resolve("bos_token", None)?,
                resolve("eos_token", None)?,
                resolve("pad_token", None)?,
                resolve("unk_token", None)?,
            ),
        };
        let mut stops = generation_stops(dir)?;
        stops.extend(eos.as_ref().map(|(_, id)| *id));
        if let Some(b) = builtin {
            stops.extend(b.stops.iter().filter_map(|t| tokenizer.token_to_id(t)));
        }
        let mut seen = std::collections::BTreeSet::new();
        stops.retain(|id| seen.insert(*id));
        let text_end = builtin
            .and_then(|b| b.text_end)
            .and_then(|t| tokenizer.token_to_id(t))
            .or(eos.as_ref().map(|(_, id)| *id));
        let pad_id = pad
            .as_ref()
            .or(eos.as_ref())
            .map(|(_, id)| *id)
            .or(stops.first().copied())
            .ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "{tok_file}: no pad or end-of-sequence token (name `eos_token` in tokenizer_config.json)"
                ))
            })?;
        let special = SpecialIds {
            bos: bos.as_ref().map(|(_, id)| *id),
            eos: eos.as_ref().map(|(_, id)| *id),
            pad: pad_id,
            stops,
            text_end,
            // A built-in template's format starts with its BOS, if it has one.
            add_bos: sources
                .flag("add_bos_token")
                .or(builtin.map(|b| b.bos.is_some())),
        };
        let vars = RenderVars {
            bos_token: bos.map(|(t, _)| t),
            eos_token: eos.map(|(t, _)| t),
            pad_token: pad.map(|(t, _)| t),
            unk_token: unk.map(|(t, _)| t),
            ..Default::default()
        };
        Ok(ChatFormat {
            tokenizer,
            template,
            special,
            vars,
        })
    }
}
