//! GRPO against TRL: advantages, loss, gradients and logged metrics of
//! `GRPOTrainer._compute_loss` on fixed rollouts, for every loss type,
//! reward scaling, β = 0 and 0.04, μ = 1 and 2 with both clip sides hit
//! (`tests/fixtures/grpo/`: the script that computed them and its output).

mod common;

use common::*;
use herd_engine::checkpoint::{load_adapter, load_model};
use herd_engine::grpo::{self, Baseline, GrpoLoss, LossType, Rollout, Scale};

fn grpo_expected() -> serde_json::Value {
    let path = fixtures().join("../grpo/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    flat(v).into_iter().map(|x| x as f32).collect()
}

/// The counted entries of a padded per-token row.
fn counted(row: &serde_json::Value, mask: &[bool]) -> Vec<f32> {
    floats(row)
        .into_iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(x, _)| x)
        .collect()
}

#[test]
fn advantages_match_trl() {
    let e = grpo_expected();
    let rewards = floats(&e["rewards"]);
    let group = e["group"].as_u64().unwrap() as usize;
    for case in e["cases"].as_array().unwrap() {
        let scale = match case["scale_rewards"].as_str().unwrap() {
            "group" => Scale::Group,
            "batch" => Scale::Batch,
            _ => Scale::None,
        };
        let (adv, zero) = grpo::advantages(&rewards, group, Baseline::GroupMean, scale).unwrap();
        close_all(
            &adv,
            &flat(&case["advantages"]),
            &format!("{} advantages", case["name"]),
        );
        close(
            zero as f64,
            case["frac_reward_zero_std"].as_f64().unwrap(),
            "zero std",
        );
    }
}

#[test]
fn leave_one_out_and_flat_groups() {
    let (adv, zero) = grpo::advantages(
        &[1.0, 0.0, 0.5, 2.0, 2.0, 2.0],
        3,
        Baseline::LeaveOneOut,
        Scale::None,
    )
    .unwrap();
    // r_i minus the mean of the other two.
    let want = [0.75, -0.75, 0.0, 0.0, 0.0, 0.0];
    for (a, w) in adv.iter().zip(want) {
        assert!((a - w).abs() < 1e-6, "{adv:?}");
    }
    assert_eq!(zero, 0.5);
    assert!(grpo::advantages(&[1.0, 2.0, 3.0], 2, Baseline::GroupMean, Scale::Group).is_err());
    assert!(grpo::advantages(&[1.0, 2.0], 1, Baseline::GroupMean, Scale::Group).is_err());
}

fn loss_type(case: &serde_json::Value) -> LossType {
    match case["loss_type"].as_str().unwrap() {
        "grpo" => LossType::Grpo,
        "bnpo" => LossType::Bnpo,
        "dr_grpo" => LossType::DrGrpo,
        _ => LossType::Dapo,
    }
}

/// Each case's rollouts, step and checks on `model`, whose trainable
/// parameters are `params` (the adapter's for the LoRA cases).
fn check_cases(
    model: &herd_engine::Llama,
    params: &[(String, candle_core::Var)],
    lora: bool,
    current: &serde_json::Value,
) {
    let e = grpo_expected();
    let group = e["group"].as_u64().unwrap() as usize;
    let temperature = e["temperature"].as_f64().unwrap() as f32;
    let prompts: Vec<Vec<u32>> = e["prompts"].as_array().unwrap().iter().map(ids).collect();
    let completions: Vec<Vec<u32>> = e["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let cases: Vec<&serde_json::Value> = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["lora"].as_bool().unwrap() == lora)
        .collect();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mu = case["num_iterations"].as_u64().unwrap();
        let beta = case["beta"].as_f64().unwrap() as f32;
        let advantages = floats(&case["advantages"]);
        let rollouts: Vec<Rollout> = completions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mask: Vec<bool> = mask(&case["mask"][i])[..c.len()]
                    .iter()
                    .map(|m| *m == 1)
                    .collect();
                Rollout {
                    prompt: prompts[i / group].clone(),
                    completion: c.clone(),
                    advantage: advantages[i],
                    old_logps: (mu > 1).then(|| counted(&case["old_logps"][i], &mask)),
                    ref_logps: (beta != 0.0).then(|| counted(&case["ref_logps"][i], &mask)),
                    mask,
                }
            })
            .collect();
        let what = |x: &str| format!("{name}: {x}");
        // The engine's own log-probs of the counted tokens are TRL's.
        let mine = grpo::rollout_logps(model, &rollouts, 319, temperature).unwrap();
        for (i, (r, got)) in rollouts.iter().zip(&mine).enumerate() {
            close_all(
                got,
                &counted(&current[i], &r.mask)
                    .iter()
                    .map(|x| *x as f64)
                    .collect::<Vec<_>>(),
                &what("log-probs"),
            );
        }
        let cfg = GrpoLoss {
            epsilon_low: case["epsilon_low"].as_f64().unwrap() as f32,
            epsilon_high: case["epsilon_high"].as_f64().unwrap() as f32,
            beta,
            temperature,
            loss_type: loss_type(case),
            max_completion_length: e["max_completion_length"].as_u64().unwrap() as usize,
            tokens_in_batch: rollouts.iter().map(Rollout::counted).sum(),
            micro_batches: 1,
        };
        let out = grpo::grpo_loss(model, &rollouts, 319, &cfg).unwrap();
        close(
            out.loss.to_scalar::<f32>().unwrap() as f64,
            case["loss"].as_f64().unwrap(),
            &what("loss"),
        );
        close(out.kl as f64, case["kl"].as_f64().unwrap(), &what("kl"));
        close(
            out.entropy as f64,
            case["entropy"].as_f64().unwrap(),
            &what("entropy"),
        );
        for (got, key) in [
            (out.clip_low, "clip_low"),
            (out.clip_high, "clip_high"),
            (out.clip_region, "clip_region"),
        ] {
            close(got as f64, case[key].as_f64().unwrap(), &what(key));
        }
        let grads = herd_engine::optim::gradients(&out.loss, params).unwrap();
        close(
            herd_engine::optim::global_norm(&grads).unwrap(),
            case["grad_norm"].as_f64().unwrap(),
            &what("grad norm"),
        );
        let by_name: std::collections::BTreeMap<&String, &candle_core::Tensor> =
            params.iter().map(|(n, _)| n).zip(&grads).collect();
        for (pname, w) in case["grads"].as_object().unwrap() {
            let got: Vec<f32> = by_name[pname].flatten_all().unwrap().to_vec1().unwrap();
            close_all(&got, &flat(w), &what(&format!("grad {pname}")));
        }
    }
}

#[test]
fn loss_gradients_and_metrics_match_trl() {
    let e = grpo_expected();
    let policy = load_model(&fixtures().join("policy"), &device()).unwrap();
    check_cases(&policy, &policy.params(), false, &e["current_logps"]);
    // The μ = 2 cases clip on both sides: the fixtures test clipping.
    assert!(e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["clip_low"].as_f64().unwrap() > 0.0 && c["clip_high"].as_f64().unwrap() > 0.0));
}

#[test]
fn lora_loss_gradients_and_reference_match_trl_with_peft() {
    let e = grpo_expected();
    let mut m = load_model(&fixtures().join("ref"), &device()).unwrap();
    load_adapter(&mut m, &fixtures().join("lora/adapter")).unwrap();
    let lora = m.lora.as_ref().unwrap();
    check_cases(&m, &lora.params(), true, &e["lora_current_logps"]);
    // The reference is the adapter switched off: its log-probs are TRL's.
    let case = e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["lora"] == true)
        .unwrap();
    let group = e["group"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = e["prompts"].as_array().unwrap().iter().map(ids).collect();
    let rollouts: Vec<Rollout> = e["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .enumerate()
        .map(|(i, c)| Rollout {
            prompt: prompts[i / group].clone(),
            mask: mask(&case["mask"][i])[..c.len()]
                .iter()
                .map(|m| *m == 1)
                .collect(),
            completion: c,
            advantage: 0.0,
            old_logps: None,
            ref_logps: None,
        })
        .collect();
    lora.set_enabled(false);
    let reference = grpo::rollout_logps(
        &m,
        &rollouts,
        319,
        e["temperature"].as_f64().unwrap() as f32,
    )
    .unwrap();
    lora.set_enabled(true);
    for (i, (r, got)) in rollouts.iter().zip(&reference).enumerate() {
        let want: Vec<f64> = counted(&case["ref_logps"][i], &r.mask)
            .iter()
            .map(|x| *x as f64)
            .collect();
        close_all(got, &want, "reference log-probs (adapter off)");
    }
}

#[test]
fn bad_rollouts_are_refused_by_what_is_wrong() {
    let policy = load_model(&fixtures().join("policy"), &device()).unwrap();
    let cfg = GrpoLoss {
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.04,
        temperature: 1.0,
        loss_type: LossType::Grpo,
        max_completion_length: 8,
        tokens_in_batch: 2,
        micro_batches: 1,
    };
    let r = Rollout {
        prompt: vec![312, 40],
        completion: vec![60, 316],
        mask: vec![true, true],
        advantage: 1.0,
        old_logps: None,
        ref_logps: None,
    };
    let err = grpo::grpo_loss(&policy, std::slice::from_ref(&r), 319, &cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("reference's log-probs"), "{err}");
    let short = Rollout {
        mask: vec![true],
        ..r.clone()
    };
    let err = grpo::grpo_loss(&policy, &[short], 319, &GrpoLoss { beta: 0.0, ..cfg })
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("1 mask entries for 2 completion tokens"),
        "{err}"
    );
    let none = Rollout {
        mask: vec![false, false],
        ..r
    };
    let err = grpo::grpo_loss(&policy, &[none], 319, &GrpoLoss { beta: 0.0, ..cfg })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no completion token counts"), "{err}");
}
