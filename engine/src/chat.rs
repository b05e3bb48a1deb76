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

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};
use crate::template::{ChatTemplate, RenderVars};

mod builtin;
mod load;

pub use builtin::{builtin, BuiltinTemplate, BUILTIN_TEMPLATES, CHATML, LLAMA3};

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
