//! `chat_format`: a checkpoint given a chat template (herd's `llama3` or
//! `chatml`, or a Jinja text) and, with `add_special_tokens`, the
//! template's missing special tokens, the embeddings grown to hold them
//! (`herd_engine::chat_setup`). A base model becomes trainable on dialogs;
//! the output is a new checkpoint whose lineage says what was added.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::recipe::{InputNames, JobContext, OutputKind, Recipe, Validate};
use herd_core::{ArtifactKind, JobKind};
use herd_engine::chat_setup::TemplateChoice;

/// The longest template text accepted (published ones are under 20 KB).
const MAX_TEMPLATE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// A built-in template's name (llama3, chatml) or a Jinja text.
    pub template: String,
    /// Add the template's special tokens the vocabulary lacks.
    pub add_special_tokens: bool,
}

/// ChatML by default, as TRL's `setup_chat_format`.
impl Default for Params {
    fn default() -> Self {
        Params {
            template: "chatml".into(),
            add_special_tokens: false,
        }
    }
}

impl Params {
    fn choice(&self) -> Result<TemplateChoice, String> {
        if let Some(b) = herd_engine::chat::builtin(&self.template) {
            return Ok(TemplateChoice::Builtin(b));
        }
        if self.template.contains("{{") || self.template.contains("{%") {
            return Ok(TemplateChoice::Jinja(self.template.clone()));
        }
        let names: Vec<&str> = herd_engine::chat::BUILTIN_TEMPLATES
            .iter()
            .map(|t| t.name)
            .collect();
        Err(format!(
            "template: {:?} is neither a built-in template ({}) nor a Jinja text",
            self.template,
            names.join(", ")
        ))
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        if self.template.len() > MAX_TEMPLATE_BYTES {
            return Err(format!(
                "template: {} bytes, more than the {MAX_TEMPLATE_BYTES} accepted",
                self.template.len()
            ));
        }
        if let TemplateChoice::Jinja(text) = self.choice()? {
            herd_engine::template::ChatTemplate::new(&text, "template", None)
                .map_err(|e| e.to_string())?;
            if self.add_special_tokens {
                return Err("add_special_tokens adds a built-in template's tokens; a Jinja template's must already be in the vocabulary".into());
            }
        }
        Ok(())
    }
}

/// The `chat_format` recipe.
pub struct ChatFormat;

impl Recipe for ChatFormat {
    type Params = Params;
    const KIND: JobKind = JobKind::ChatFormat;
    const INPUTS: InputNames = InputNames::only(&["model"]);
    const OUTPUTS: &'static [(&'static str, OutputKind)] = super::recipe::A_CHECKPOINT;
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let out = ctx.workdir.join("checkpoint");
        let choice = p.choice().map_err(anyhow::Error::msg)?;
        let summary = herd_engine::chat_setup::setup_chat_format(
            &model_dir,
            &out,
            &choice,
            p.add_special_tokens,
            ctx.seed,
        )?;
        ctx.finish_with("checkpoint", ArtifactKind::Checkpoint, &out, summary)
    }
}
