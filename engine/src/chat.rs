//! The Llama 3 chat format.
//!
//! `<|begin_of_text|>`, then per message `<|start_header_id|>ROLE<|end_header_id|>`
//! "\n\n" CONTENT `<|eot_id|>` (`<|eom_id|>` when the assistant asks for a
//! tool call to be run). Each segment is tokenized on its own and the ids are
//! concatenated, as Meta's reference ChatFormat does; tokenizing a templated
//! string instead would merge across boundaries and may add a second BOS.
//!
//! Encoding yields two masks beside the ids: *target* (what the assistant
//! writes: its content and closing token) and *format* (BOS, header tokens,
//! end-of-turn tokens).

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

pub const ROLES: [&str; 4] = ["system", "user", "assistant", "ipython"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The assistant asks for a tool call to be run: end with `<|eom_id|>`.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub begin_of_text: u32,
    pub end_of_text: Option<u32>,
    pub start_header: u32,
    pub end_header: u32,
    pub eot: u32,
    pub eom: Option<u32>,
    pub python_tag: Option<u32>,
    pub pad: u32,
}

pub struct ChatFormat {
    pub tokenizer: Tokenizer,
    pub special: SpecialIds,
}

impl ChatFormat {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let tok = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(tok).map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        let id = |s: &str| tokenizer.token_to_id(s);
        let need = |s: &str| {
            id(s).ok_or_else(|| EngineError::Tokenizer(format!("special token {s} is missing")))
        };
        let eot = need("<|eot_id|>")?;
        let special = SpecialIds {
            begin_of_text: need("<|begin_of_text|>")?,
            end_of_text: id("<|end_of_text|>"),
            start_header: need("<|start_header_id|>")?,
            end_header: need("<|end_header_id|>")?,
            eot,
            eom: id("<|eom_id|>"),
            python_tag: id("<|python_tag|>"),
            pad: id("<|finetune_right_pad_id|>").unwrap_or(eot),
        };
        Ok(ChatFormat { tokenizer, special })
    }

    /// Plain text to ids, no special tokens added around it.
    pub fn text(&self, s: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(s, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    fn header(&self, role: &str) -> Result<Vec<u32>> {
        if !ROLES.contains(&role) {
            return Err(EngineError::Input(format!(
                "unknown role {role:?} (expected one of {ROLES:?})"
            )));
        }
        let mut ids = vec![self.special.start_header];
        ids.extend(self.text(role)?);
        ids.push(self.special.end_header);
        ids.extend(self.text("\n\n")?);
        Ok(ids)
    }

    fn end_of(&self, m: &Message) -> Result<u32> {
        if m.eom {
            if m.role != "assistant" {
                return Err(EngineError::Input(format!(
                    "only assistant messages end with <|eom_id|>, not {:?}",
                    m.role
                )));
            }
            self.special
                .eom
                .ok_or_else(|| EngineError::Tokenizer("tokenizer has no <|eom_id|>".into()))
        } else {
            Ok(self.special.eot)
        }
    }

    /// One message: header and end token are format; assistant content and
    /// end token are targets.
    pub fn encode_message(&self, m: &Message) -> Result<Encoded> {
        let target = u8::from(m.role == "assistant");
        let mut e = Encoded::default();
        e.push(&self.header(&m.role)?, 0, 1);
        e.push(&self.text(m.content.trim())?, target, 0);
        e.push(&[self.end_of(m)?], target, 1);
        Ok(e)
    }

    /// A whole dialog, starting with BOS.
    pub fn encode_dialog(&self, messages: &[Message]) -> Result<Encoded> {
        let mut e = Encoded::default();
        e.push(&[self.special.begin_of_text], 0, 1);
        for m in messages {
            e.extend(&self.encode_message(m)?);
        }
        Ok(e)
    }

    /// Plain text for language modelling: BOS, then every token a target
    /// (and the end-of-text token, where the tokenizer has one).
    pub fn encode_text(&self, s: &str) -> Result<Encoded> {
        let mut e = Encoded::default();
        e.push(&[self.special.begin_of_text], 0, 1);
        e.push(&self.text(s)?, 1, 0);
        if let Some(end) = self.special.end_of_text {
            e.push(&[end], 1, 1);
        }
        Ok(e)
    }

    /// A prompt ready for the assistant to answer: dialog + assistant header.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Encoded> {
        let mut e = self.encode_dialog(messages)?;
        e.push(&self.header("assistant")?, 0, 1);
        Ok(e)
    }

    /// An assistant completion that follows `encode_prompt`: content + <|eot_id|>.
    pub fn encode_completion(&self, content: &str) -> Result<Encoded> {
        let mut e = Encoded::default();
        e.push(&self.text(content.trim())?, 1, 0);
        e.push(&[self.special.eot], 1, 1);
        Ok(e)
    }

    /// Ids back to text, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v = vec![self.special.eot];
        v.extend(self.special.eom);
        v
    }
}

/// The Llama 3 special tokens, in the order they get ids after the base vocab.
pub const SPECIAL_TOKENS: [&str; 8] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
];

/// GPT-2's byte-to-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut out = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).expect("valid char");
    }
    out
}

/// A byte-level tokenizer with no merges (one token per byte) plus the
/// Llama 3 special tokens: vocab 256 + 8. For models built from scratch
/// (the quickstart); it needs no training and no download.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), (i as u32).into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// The Llama 3 chat template in Jinja, as transformers' `apply_chat_template`
/// reads it: the same tokens as [`ChatFormat::encode_dialog`] and, with
/// `add_generation_prompt`, [`ChatFormat::encode_prompt`] (contents trimmed).
pub const LLAMA3_CHAT_TEMPLATE: &str = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// What a Hugging Face checkpoint carries beside `tokenizer.json` so that
/// transformers and serving stacks find the chat template, the special tokens
/// and the stop tokens: (file name, JSON). For models built from scratch
/// (imported checkpoints bring their own, and training keeps them).
pub fn hf_tokenizer_files(
    chat: &ChatFormat,
    model_max_length: usize,
) -> Vec<(&'static str, serde_json::Value)> {
    let s = chat.special;
    let name = |id: u32| chat.tokenizer.id_to_token(id).unwrap_or_default();
    let (bos, eot, pad) = (name(s.begin_of_text), name(s.eot), name(s.pad));
    let added: serde_json::Map<String, serde_json::Value> = chat
        .tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .map(|(id, t)| {
            (
                id.to_string(),
                serde_json::json!({"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}),
            )
        })
        .collect();
    let mut stops: Vec<u32> = s.end_of_text.into_iter().collect();
    stops.extend(chat.stop_ids());
    vec![
        (
            "tokenizer_config.json",
            serde_json::json!({
                "added_tokens_decoder": added, "bos_token": bos, "eos_token": eot, "pad_token": pad,
                "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": false,
                "model_input_names": ["input_ids", "attention_mask"],
                "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
            }),
        ),
        (
            "special_tokens_map.json",
            serde_json::json!({"bos_token": bos, "eos_token": eot, "pad_token": pad}),
        ),
        (
            "generation_config.json",
            serde_json::json!({"bos_token_id": s.begin_of_text, "eos_token_id": stops, "pad_token_id": s.pad}),
        ),
    ]
}
