//! One round of the quickstart's loop as a round spec (the Llama 3 recipe
//! at demo scale), and the training settings that differ between the tiny
//! model from scratch and a user's pretrained model.

use std::collections::BTreeMap;

use herd_client::RoundSpec;
use serde_json::{json, Value};
use uuid::Uuid;

/// How the rounds train: the tiny model from scratch, or a user's model.
#[derive(Debug, Clone, Copy)]
pub struct Training {
    pub sft_lr: f64,
    pub rm_lr: f64,
    /// GRPO's learning rate (`--method grpo`).
    pub grpo_lr: f64,
    /// 0: full fine-tuning; else LoRA adapters of this rank, merged.
    pub lora_rank: usize,
    /// Samples per prompt in rejection sampling.
    pub k: usize,
    pub batch: usize,
    /// Rejection sampling keeps only samples the task's checker accepts
    /// (else the reward model alone picks, as in Llama 3's general data).
    pub require_correct: bool,
}

impl Training {
    /// The tiny model from random init: high learning rates, full FT.
    pub const TINY: Training = Training {
        sft_lr: 1e-3,
        rm_lr: 1e-3,
        // With a 4-step warm-up each round (each round's job starts Adam
        // afresh): 1e-4 without it raised held-out accuracy only 0.38 ->
        // 0.48 in 12 rounds; 6e-4 collapses.
        grpo_lr: 2e-4,
        lora_rank: 0,
        k: 8,
        batch: 64,
        require_correct: true,
    };

    /// A pretrained model: learning rates of the usual recipes (LoRA's ten
    /// times full fine-tuning's), fewer samples, the reward model alone
    /// choosing among them (a model new to the task may get none right).
    pub fn pretrained(lora_rank: usize) -> Training {
        let lr = if lora_rank > 0 { 2e-4 } else { 2e-5 };
        Training {
            sft_lr: lr,
            rm_lr: lr,
            grpo_lr: lr / 10.0,
            lora_rank,
            k: 4,
            batch: 8,
            require_correct: false,
        }
    }
}

/// A round of online RL instead: one `grpo` job rewarded by the task's
/// checker as a verifier (`number`: the last number equals the answer),
/// warming its learning rate up over 4 steps (each round starts Adam anew)
/// and held to the round's starting policy by a KL term (β 0.04; without
/// it, at lr 2.5e-4, a round could undo the last ones: 24 rounds ended at
/// 0.48 after 0.72; with it, at lr 2e-4, at 0.80), then `eval` against the
/// round's starting policy. `samples` is the
/// round's sample budget (the Llama 3 loop's: annotation pairs plus
/// rejection sampling's k per prompt).
pub fn grpo_round_spec(
    experiment: Uuid,
    vars: BTreeMap<String, String>,
    seed: u64,
    t: Training,
    samples: usize,
) -> RoundSpec {
    let (prompts_per_step, group) = (16, 8);
    let steps = samples.div_ceil(prompts_per_step * group);
    let lora = t.lora_rank > 0;
    let mut hp = json!({
        "steps": steps, "prompts_per_step": prompts_per_step, "group_size": group,
        "max_new_tokens": 24, "temperature": 0.8, "batch_size": 64,
        "lr": t.grpo_lr, "warmup_steps": 4, "loss_type": "dapo", "beta": 0.04,
        "verifier_rule": "number", "verifier_tolerance": 0.0,
    });
    if lora {
        hp["lora_rank"] = json!(t.lora_rank);
        hp["lora_alpha"] = json!(2 * t.lora_rank);
    }
    let mut jobs = vec![json!({"name": "grpo", "kind": "grpo",
        "inputs": {"policy": "$policy", "prompts": "$prompts"}, "hyperparameters": hp})];
    let policy = if lora {
        jobs.push(json!({"name": "grpo_merged", "kind": "merge",
            "inputs": {"model": "$policy", "adapter": "grpo.adapter"}}));
        "grpo_merged.checkpoint"
    } else {
        "grpo.checkpoint"
    };
    jobs.push(json!({"name": "eval", "kind": "eval",
        "inputs": {"policy": policy, "baseline": "$policy", "prompts": "$heldout"},
        "hyperparameters": {"max_new_tokens": 24, "batch_size": t.batch}}));
    RoundSpec {
        experiment,
        seed,
        vars,
        final_policy: Some(policy.to_string()),
        jobs: jobs
            .into_iter()
            .map(|j| serde_json::from_value(j).expect("the quickstart's jobs are round jobs"))
            .collect(),
    }
}

/// The round spec: the Llama 3 loop at demo scale.
pub fn round_spec(
    experiment: Uuid,
    vars: BTreeMap<String, String>,
    seed: u64,
    epochs: f64,
) -> RoundSpec {
    round_spec_with(experiment, vars, seed, epochs, Training::TINY)
}

/// The round spec with the given training settings. With LoRA, each
/// training job makes an adapter and a `merge` job makes it a checkpoint
/// (the reward model's too), so sampling, DPO's reference and the next
/// round all take plain checkpoints; the two DPO adapters are averaged
/// exactly (concatenated ranks) before their merge.
pub fn round_spec_with(
    experiment: Uuid,
    vars: BTreeMap<String, String>,
    seed: u64,
    epochs: f64,
    t: Training,
) -> RoundSpec {
    let lora = t.lora_rank > 0;
    let with_lora = |mut hp: Value| {
        if lora {
            hp["lora_rank"] = json!(t.lora_rank);
            hp["lora_alpha"] = json!(2 * t.lora_rank);
        }
        hp
    };
    let trained = |job: &str| {
        if lora {
            format!("{job}_merged.checkpoint")
        } else {
            format!("{job}.checkpoint")
        }
    };
    let (gen_batch, train_batch) = (t.batch, (t.batch / 4).max(2));
    let mut jobs = vec![
        json!({"name": "annotate", "kind": "annotate", "inputs": {"policy": "$policy", "prompts": "$prompts"},
         "hyperparameters": {"temperature": 1.0, "max_new_tokens": 24, "batch_size": gen_batch}}),
        json!({"name": "curate", "kind": "curate", "inputs": {"data": "annotate.data"}}),
        // The reward model trains on every round's preferences so far,
        // from the pre-trained (here: base) checkpoint, as Llama 3 does.
        json!({"name": "preferences", "kind": "mix", "inputs": {"earlier": "$all_preferences", "new": "annotate.data"}}),
        json!({"name": "curate_all", "kind": "curate", "inputs": {"data": "preferences.data"}}),
    ];
    // With LoRA, a training job's adapter merged into the model it adapts.
    let merge = |jobs: &mut Vec<Value>, job: &str, model: &str| {
        if lora {
            jobs.push(json!({"name": format!("{job}_merged"), "kind": "merge",
                "inputs": {"model": model, "adapter": format!("{job}.adapter")}}));
        }
    };
    jobs.push(json!({"name": "rm", "kind": "rm", "inputs": {"model": "$base", "data": "curate_all.data"},
        "hyperparameters": with_lora(json!({"lr": t.rm_lr, "epochs": epochs * 3.0, "batch_size": 8, "max_seq_len": 160, "warmup_steps": 20, "heldout_fraction": 0.2}))}));
    merge(&mut jobs, "rm", "$base");
    jobs.push(json!({"name": "sample", "kind": "sample", "inputs": {"policy": "$policy", "rm": trained("rm"), "prompts": "$prompts"},
        "hyperparameters": {"k": t.k, "temperature": 1.0, "max_new_tokens": 24, "batch_size": gen_batch, "require_correct": t.require_correct}}));
    jobs.push(json!({"name": "sft", "kind": "sft", "inputs": {"model": "$policy", "data": "sample.data"},
        "hyperparameters": with_lora(json!({"lr": t.sft_lr, "epochs": epochs, "batch_size": train_batch * 2, "max_seq_len": 160, "warmup_steps": 10}))}));
    merge(&mut jobs, "sft", "$policy");
    for (name, beta) in [("dpo_a", 0.1), ("dpo_b", 0.2)] {
        jobs.push(json!({"name": name, "kind": "dpo", "inputs": {"model": trained("sft"), "data": "curate.data"},
            "hyperparameters": with_lora(json!({"lr": 1e-5, "epochs": (epochs * 0.25).max(1.0), "batch_size": train_batch, "max_seq_len": 160, "warmup_steps": 5, "beta": beta, "nll_weight": 0.2}))}));
    }
    let (a, b) = if lora {
        ("dpo_a.adapter", "dpo_b.adapter")
    } else {
        ("dpo_a.checkpoint", "dpo_b.checkpoint")
    };
    jobs.push(json!({"name": "average", "kind": "average", "inputs": {"a": a, "b": b}}));
    merge(&mut jobs, "average", &trained("sft"));
    let policy = trained("average");
    jobs.push(json!({"name": "eval", "kind": "eval", "inputs": {"policy": policy, "baseline": "$policy", "rm": trained("rm"), "prompts": "$heldout"},
        "hyperparameters": {"max_new_tokens": 24, "batch_size": gen_batch}}));
    RoundSpec {
        experiment,
        seed,
        vars,
        final_policy: Some(policy),
        jobs: jobs
            .into_iter()
            .map(|j| serde_json::from_value(j).expect("the quickstart's jobs are round jobs"))
            .collect(),
    }
}
