//! Chat formats: a model's own template, tokenizer and special tokens, and
//! what each token of a rendered conversation is for.
//!
//! The text comes from the model's chat template (`template.rs`), exactly as
//! transformers renders it; herd's Llama 3 format is one built-in template
//! among others, used when a model ships none and its tokenizer speaks it.
//! Beside the ids, encoding yields two masks, computed from the render
//! itself rather than from a hand-written format:
//!
//! * *target* (what the assistant writes): where the template marks it with
//!   `{% generation %}`, exactly those characters (as transformers'
//!   `return_assistant_tokens_mask`); otherwise each assistant message's
//!   content as rendered plus the end-of-turn text after it, up to and
//!   including the first stop token (`<|im_end|>`, `<|eot_id|>`, `</s>`).
//!   Whatever follows that token (ChatML's "\n") is format, not target:
//!   the model stops at the stop token and never writes it.
//! * *format*: every token the template adds that is not message content.
//!
//! Where the content lies is found by rendering the conversation a second
//! time with a unique sentinel as each message's content: the literal text
//! between sentinels is the template's, and aligning it with the real
//! render finds each content's span, whatever the template does around it
//! (system blocks, dates, tool preambles). A token is in a span when any of
//! its characters is (transformers' rule).
//!
//! Tokenization follows transformers and TRL: a conversation is rendered and
//! tokenized whole without added special tokens (the template writes BOS);
//! a prompt and its completions (DPO, RM, scoring) are split at the common
//! prefix of the prompt's generation render and each prompt+completion
//! render, and each side is tokenized on its own, as TRL's
//! `maybe_apply_chat_template` + tokenization do.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::template::{ChatTemplate, RenderVars};

/// The roles a dataset's messages may have: what templates know (a
/// template refuses roles it does not handle, with its own words).
pub const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "ipython"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Llama 3: the assistant asks for a tool call to be run, so the turn
    /// ends with `<|eom_id|>` (herd's built-in template reads this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eom: bool,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            eom: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub target_mask: Vec<u8>,
    pub format_mask: Vec<u8>,
}

impl Encoded {
    fn push(&mut self, ids: &[u32], target: u8, format: u8) {
        self.ids.extend_from_slice(ids);
        self.target_mask
            .extend(std::iter::repeat_n(target, ids.len()));
        self.format_mask
            .extend(std::iter::repeat_n(format, ids.len()));
    }
    pub fn extend(&mut self, other: &Encoded) {
        self.ids.extend_from_slice(&other.ids);
        self.target_mask.extend_from_slice(&other.target_mask);
        self.format_mask.extend_from_slice(&other.format_mask);
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The special tokens training and generation need, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    /// Beginning of sequence (none for models without one, e.g. Qwen2).
    pub bos: Option<u32>,
    /// The tokenizer's end-of-sequence token (an instruct model's end of turn).
    pub eos: Option<u32>,
    /// Pads batches: the model's pad token or, lacking one, EOS (padding is
    /// always masked, so which id it is never changes a loss).
    pub pad: u32,
    /// Generation stops at any of these: `generation_config.json`'s
    /// `eos_token_id` (an int or a list), the tokenizer's EOS, and the
    /// built-in template's end-of-turn tokens.
    pub stops: Vec<u32>,
    /// What ends a plain-text row (EOS; Llama 3's `<|end_of_text|>`).
    pub text_end: Option<u32>,
    /// Whether plain text starts with BOS (`add_bos_token`; without it,
    /// whatever the tokenizer's post-processor adds).
    pub add_bos: Option<bool>,
}

/// A chat template herd carries, for models that ship none: its Jinja, the
/// special tokens it writes, and what ends a turn.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinTemplate {
    pub name: &'static str,
    pub source: &'static str,
    pub bos: Option<&'static str>,
    pub eos: &'static str,
    pub pad: Option<&'static str>,
    /// Further stop tokens (used when the vocabulary has them).
    pub stops: &'static [&'static str],
    /// What ends a plain-text row, when the vocabulary has it (else EOS).
    pub text_end: Option<&'static str>,
    /// Special tokens the template writes; all must be in the vocabulary.
    pub tokens: &'static [&'static str],
}

/// Llama 3's format as Meta's reference `ChatFormat` writes it (contents
/// trimmed; `<|eom_id|>` where an assistant message has `eom`).
pub const LLAMA3: BuiltinTemplate = BuiltinTemplate {
    name: "llama3",
    source: "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}{%- if message['eom'] is defined and message['eom'] %}{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    bos: Some("<|begin_of_text|>"),
    eos: "<|eot_id|>",
    pad: Some("<|finetune_right_pad_id|>"),
    stops: &["<|eom_id|>"],
    text_end: Some("<|end_of_text|>"),
    tokens: &["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
};

/// ChatML, as TRL's `setup_chat_format` writes it.
pub const CHATML: BuiltinTemplate = BuiltinTemplate {
    name: "chatml",
    source: "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    bos: None,
    eos: "<|im_end|>",
    pad: None,
    stops: &[],
    text_end: None,
    tokens: &["<|im_start|>", "<|im_end|>"],
};

pub const BUILTIN_TEMPLATES: [BuiltinTemplate; 2] = [LLAMA3, CHATML];

/// A built-in template by name.
pub fn builtin(name: &str) -> Option<BuiltinTemplate> {
    BUILTIN_TEMPLATES.into_iter().find(|t| t.name == name)
}

/// A tokenizer, the chat template it is used with, and its special tokens.
pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub special: SpecialIds,
    vars: RenderVars,
}

impl std::fmt::Debug for ChatFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatFormat")
            .field("template", &self.template.origin)
            .field("special", &self.special)
            .finish()
    }
}

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

/// The content of message `k` in the sentinel render.
fn sentinel(k: usize) -> String {
    format!("\u{10FFF2}{k}\u{10FFF3}")
}

/// Where each message's content lies in a rendered conversation, and the
/// spans the assistant is trained on.
#[derive(Debug, Clone)]
struct Layout {
    text: String,
    /// Per message: its content's byte range in `text`.
    content: Vec<Range<usize>>,
    /// Per assistant message (by message index): content + end of turn.
    targets: Vec<(usize, Range<usize>)>,
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

    /// Plain text to ids, no special tokens added around it.
    pub fn text(&self, s: &str) -> Result<Vec<u32>> {
        Ok(self.tokenize(s)?.0)
    }

    /// Ids and byte offsets, no special tokens added (the template writes them).
    fn tokenize(&self, s: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self
            .tokenizer
            .encode(s, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<crate::template::Rendered> {
        let vars = RenderVars {
            add_generation_prompt,
            ..self.vars.clone()
        };
        self.template.render(&messages, &vars)
    }

    /// Where each message's content and each assistant turn lies in the
    /// render (see the module doc).
    fn layout(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Layout> {
        let real = self.render(messages, add_generation_prompt)?;
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(k, m)| Message {
                content: sentinel(k),
                ..m.clone()
            })
            .collect();
        let shape = self.render(&marked, add_generation_prompt)?.text;
        let where_ = |why: String| EngineError::config(&self.template.origin, "chat_template", why);

        // The template's own text between contents, and whose content follows.
        let mut literals: Vec<&str> = vec![];
        let mut order: Vec<usize> = vec![];
        let mut rest = shape.as_str();
        loop {
            let next = (0..messages.len())
                .filter_map(|k| rest.find(&sentinel(k)).map(|at| (at, k)))
                .min();
            match next {
                Some((at, k)) => {
                    literals.push(&rest[..at]);
                    if order.contains(&k) {
                        return Err(where_(format!(
                            "it renders the content of message {} ({}) more than once, so its tokens can't be told apart",
                            k + 1, messages[k].role
                        )));
                    }
                    order.push(k);
                    rest = &rest[at + sentinel(k).len()..];
                }
                None => {
                    literals.push(rest);
                    break;
                }
            }
        }
        for (k, m) in messages.iter().enumerate() {
            if !order.contains(&k) && m.role == "assistant" {
                return Err(where_(format!(
                    "it does not render the content of message {} (assistant), so there is nothing to train on",
                    k + 1
                )));
            }
        }

        // Align the real render with the literals.
        let text = real.text;
        let mismatch = |at: usize| {
            where_(format!(
                "its output for this conversation does not follow its own layout near byte {at} (a template whose text depends on the contents in ways herd can't align)"
            ))
        };
        if !text.starts_with(literals[0]) {
            return Err(mismatch(0));
        }
        let mut pos = literals[0].len();
        let mut content = vec![0..0; messages.len()];
        for (j, &k) in order.iter().enumerate() {
            let after = literals[j + 1];
            let last = j + 1 == order.len();
            let c = messages[k].content.as_str();
            let fits = |cand: &str| {
                let tail = &text[pos..];
                tail.starts_with(cand)
                    && if last {
                        tail[cand.len()..] == *after
                    } else {
                        tail[cand.len()..].starts_with(after)
                    }
            };
            let len = if fits(c) {
                c.len()
            } else if fits(c.trim()) {
                // The template trims; the span starts where the trimmed text does.
                c.trim().len()
            } else {
                let found = if last {
                    text.len()
                        .checked_sub(after.len())
                        .filter(|&e| e >= pos && text.ends_with(after))
                } else if after.is_empty() {
                    None
                } else {
                    text[pos..].find(after).map(|i| pos + i)
                };
                let end = found.ok_or_else(|| mismatch(pos))?;
                let shown = &text[pos..end];
                if !c.contains(shown) || (shown.trim().is_empty() && !c.trim().is_empty()) {
                    return Err(where_(format!(
                        "message {} ({}): the template renders its content as {:?}, which is not found in the content, so its tokens can't be located",
                        k + 1,
                        messages[k].role,
                        shown.chars().take(80).collect::<String>()
                    )));
                }
                end - pos
            };
            content[k] = pos..pos + len;
            pos += len + after.len();
        }
        if pos != text.len() {
            return Err(mismatch(pos));
        }

        // What the assistant writes.
        let mut targets = vec![];
        if self.template.has_generation {
            let mut spans = real.generation.clone();
            spans.sort_by_key(|r| r.start);
            for span in spans {
                let k = (0..messages.len())
                    .filter(|&k| messages[k].role == "assistant")
                    .find(|&k| {
                        content[k].start >= span.start
                            && content[k].start < span.end.max(span.start + 1)
                    })
                    .unwrap_or(usize::MAX);
                targets.push((k, span));
            }
        } else {
            let stop_texts: Vec<String> = self
                .special
                .stops
                .iter()
                .filter_map(|&id| self.tokenizer.id_to_token(id))
                .collect();
            for (j, &k) in order.iter().enumerate() {
                if messages[k].role != "assistant" {
                    continue;
                }
                let end = content[k].end;
                let after = literals[j + 1];
                // The end of turn: through the first stop token after the content.
                let eot = stop_texts
                    .iter()
                    .filter_map(|s| after.find(s.as_str()).map(|i| i + s.len()))
                    .min()
                    .unwrap_or(0);
                targets.push((k, content[k].start..end + eot));
            }
        }
        Ok(Layout {
            text,
            content,
            targets,
        })
    }

    /// Tokens of `text[range]` with masks: target where a token touches one
    /// of `targets`, format where it touches no content span.
    fn masked(
        &self,
        layout: &Layout,
        range: Range<usize>,
        targets: &[Range<usize>],
    ) -> Result<Encoded> {
        let piece = &layout.text[range.clone()];
        let (ids, offsets) = self.tokenize(piece)?;
        let touches = |spans: &[Range<usize>], (s, e): (usize, usize)| {
            let (s, e) = (s + range.start, e.max(s + 1) + range.start);
            spans.iter().any(|r| r.start < e && s < r.end)
        };
        let mut out = Encoded::default();
        for (id, off) in ids.iter().zip(offsets) {
            let target = touches(targets, off);
            let content = touches(&layout.content, off);
            out.push(&[*id], u8::from(target), u8::from(!content));
        }
        Ok(out)
    }

    /// A whole conversation, every assistant turn a target (TRL's
    /// `assistant_only_loss`).
    pub fn encode_dialog(&self, messages: &[Message]) -> Result<Encoded> {
        self.encode_dialog_turns(messages, false)
    }

    /// A whole conversation; with `last_only`, only the last assistant turn
    /// is a target.
    pub fn encode_dialog_turns(&self, messages: &[Message], last_only: bool) -> Result<Encoded> {
        let layout = self.layout(messages, false)?;
        let last = layout
            .targets
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| *k != usize::MAX)
            .max();
        let targets: Vec<Range<usize>> = layout
            .targets
            .iter()
            .filter(|(k, _)| !last_only || Some(*k) == last)
            .map(|(_, r)| r.clone())
            .collect();
        self.masked(&layout, 0..layout.text.len(), &targets)
    }

    /// Plain text for language modelling: BOS (as `add_bos_token` or the
    /// tokenizer's post-processor says), the text, then the end-of-text
    /// token; every token but BOS a target.
    pub fn encode_text(&self, s: &str) -> Result<Encoded> {
        let mut e = Encoded::default();
        let ids = match self.special.add_bos {
            Some(add) => {
                let mut ids = self.text(s)?;
                if add {
                    if let Some(bos) = self.special.bos {
                        ids.insert(0, bos);
                    }
                }
                ids
            }
            None => self
                .tokenizer
                .encode(s, true)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec(),
        };
        let (lead, body) = match (self.special.bos, ids.first()) {
            (Some(b), Some(&f)) if f == b => ids.split_at(1),
            _ => ids.split_at(0),
        };
        e.push(lead, 0, 1);
        e.push(body, 1, 0);
        if let Some(end) = self.special.text_end {
            if body.last() != Some(&end) {
                e.push(&[end], 1, 1);
            }
        }
        Ok(e)
    }

    /// A prompt ready for the assistant to answer (the template's
    /// generation prompt), tokenized whole.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Encoded> {
        let layout = self.layout(messages, true)?;
        self.masked(&layout, 0..layout.text.len(), &[])
    }

    /// A prompt and completions of it, each side tokenized on its own and
    /// split where the prompt's generation render and every
    /// prompt+completion render stop agreeing (TRL's way): the prompt's ids
    /// are the same for every completion.
    pub fn encode_exchange(
        &self,
        prompt: &[Message],
        completions: &[&str],
    ) -> Result<(Encoded, Vec<Encoded>)> {
        let asked = self.layout(prompt, true)?;
        let mut full = Vec::with_capacity(completions.len());
        let mut split = asked.text.len();
        for c in completions {
            let mut messages = prompt.to_vec();
            messages.push(Message::new("assistant", c));
            let l = self.layout(&messages, false)?;
            split = common_prefix(&asked.text[..split], &l.text);
            full.push(l);
        }
        let prompt_enc = self.masked(&asked, 0..split, &[])?;
        let mut out = Vec::with_capacity(full.len());
        for l in &full {
            let targets: Vec<Range<usize>> = l.targets.iter().map(|(_, r)| r.clone()).collect();
            out.push(self.masked(l, split..l.text.len(), &targets)?);
        }
        Ok((prompt_enc, out))
    }

    /// Ids back to text, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Generation stops at any of these.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.special.stops.clone()
    }

    /// Every special token id the format uses, with the file field it came
    /// from (for checking them against the model's vocabulary size).
    pub fn special_id_list(&self) -> Vec<(&'static str, u32)> {
        let s = &self.special;
        let mut v: Vec<(&'static str, u32)> = vec![("pad_token", s.pad)];
        v.extend(s.bos.map(|b| ("bos_token", b)));
        v.extend(s.eos.map(|b| ("eos_token", b)));
        v.extend(s.stops.iter().map(|&id| ("eos_token_id", id)));
        v
    }
}

/// The longest common prefix of two strings, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, x), y) in a.char_indices().zip(b.chars()) {
        if x != y {
            return i;
        }
        n = i + x.len_utf8();
    }
    n
}

pub use crate::chat_files::{byte_tokenizer_json, hf_tokenizer_files, SPECIAL_TOKENS};
