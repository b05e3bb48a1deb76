//! The chat templates herd carries for models that ship none: Llama 3's
//! format as Meta writes it, and ChatML as TRL's `setup_chat_format` does.

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
