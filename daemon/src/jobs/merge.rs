//! `merge`: a LoRA adapter merged into the checkpoint it adapts (W + scale ·
//! B A for every targeted projection), giving a plain checkpoint that
//! computes what base + adapter computes: what sample, eval and export of a
//! full model take. A reward model's adapter merges into a reward model.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use herd_core::{ArtifactKind, JobKind};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The `merge` recipe.
pub struct Merge;

impl Recipe for Merge {
    type Params = Params;
    const KIND: JobKind = JobKind::Merge;
    const INPUTS: InputNames = InputNames::only(&["model", "adapter"]);
    const OUTPUTS: &'static [(&'static str, OutputKind)] = super::recipe::A_CHECKPOINT;
    const ACCEPTS: Accepts = &[("adapter", &[ArtifactKind::Adapter])];
    fn run(ctx: &mut JobContext, _: Params) -> Result<Value> {
        let model_dir = ctx.input("model")?.to_path_buf();
        let adapter_dir = ctx.input("adapter")?.to_path_buf();
        let config = herd_engine::lora::LoraConfig::from_file(
            &adapter_dir.join(herd_engine::lora::ADAPTER_CONFIG),
        )
        .context("input `adapter`")?;
        let mut model = if config.score {
            herd_engine::checkpoint::load_as_reward_model(&model_dir, &ctx.device, ctx.seed)?
        } else {
            herd_engine::checkpoint::load_model(&model_dir, &ctx.device)?
        };
        herd_engine::checkpoint::load_adapter(&mut model, &adapter_dir)
            .context("input `adapter`")?;
        let merged = model.merged_tensors()?;
        let config = model.config.clone();
        let out = ctx.workdir.join("checkpoint");
        let merged = herd_engine::Llama::from_tensors(config, merged, &ctx.device)?;
        herd_engine::checkpoint::save_model(&merged, &out, Some(&model_dir))?;
        let lora = &model.lora.as_ref().expect("loaded").config;
        let summary = json!({"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "reward_model": lora.score});
        ctx.finish_with("checkpoint", ArtifactKind::Checkpoint, &out, summary)
    }
}
