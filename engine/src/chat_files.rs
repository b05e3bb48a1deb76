//! The files a model herd builds from scratch carries beside its weights: a
//! byte-level tokenizer with Llama 3's special tokens, and the tokenizer
//! config, special-tokens map and generation config transformers and
//! serving stacks read. Apart from `chat.rs`, which reads such files.

use crate::chat::ChatFormat;

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

/// What a Hugging Face checkpoint carries beside `tokenizer.json` so that
/// transformers and serving stacks find the chat template, the special tokens
/// and the stop tokens: (file name, JSON). For models built from scratch
/// (imported checkpoints bring their own, and training keeps them).
pub fn hf_tokenizer_files(
    chat: &ChatFormat,
    model_max_length: usize,
) -> Vec<(&'static str, serde_json::Value)> {
    let s = &chat.special;
    let name = |id: Option<u32>| id.and_then(|id| chat.tokenizer.id_to_token(id));
    let (bos, eot, pad) = (name(s.bos), name(s.eos), name(Some(s.pad)));
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
    let mut stops: Vec<u32> = s.text_end.into_iter().collect();
    stops.extend(
        chat.stop_ids()
            .into_iter()
            .filter(|id| Some(*id) != s.text_end),
    );
    vec![
        (
            "tokenizer_config.json",
            serde_json::json!({
                "added_tokens_decoder": added, "bos_token": bos, "eos_token": eot, "pad_token": pad,
                "chat_template": chat.template.source, "clean_up_tokenization_spaces": false,
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
            serde_json::json!({"bos_token_id": s.bos, "eos_token_id": stops, "pad_token_id": s.pad}),
        ),
    ]
}
