//! Shared test helpers: where the fixtures are, tolerant comparison, and
//! the fixtures' rows as engine inputs.

#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/llama-tiny` in this repository (or $HERD_FIXTURES).
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("HERD_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny")
}

pub fn expected() -> serde_json::Value {
    let p = fixtures().join("expected.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// |a - b| <= 1e-5 + 1e-4 * |b|
pub fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
        "{what}: got {a}, expected {b}"
    );
}

pub fn close_all(a: &[f32], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (*x as f64 - y).abs() - 1e-4 * y.abs();
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= 1e-5,
        "{what}: index {} got {}, expected {}",
        worst.1,
        a[worst.1],
        b[worst.1]
    );
}

pub fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap()],
    }
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn mask(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

/// A fixture sequence: ids with its completion and format masks.
pub fn seq(v: &serde_json::Value) -> herd_engine::chat::Encoded {
    herd_engine::chat::Encoded {
        ids: ids(&v["ids"]),
        target_mask: mask(&v["completion_mask"]),
        format_mask: mask(&v["format_mask"]),
    }
}

/// expected.json's `dpo.rows` as chosen/rejected pairs.
pub fn dpo_pairs() -> Vec<herd_engine::objective::Pair> {
    expected()["dpo"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| herd_engine::objective::Pair {
            chosen: seq(&r["chosen"]),
            rejected: seq(&r["rejected"]),
        })
        .collect()
}

/// One DPO + NLL step of `policy` against cached reference log-probs
/// (rc, rr), checked against `want` (per-example log-probs, the loss and
/// its terms, the gradient norm over `params` and the listed gradients).
#[allow(clippy::too_many_arguments)]
pub fn check_dpo_step(
    policy: &herd_engine::Llama,
    pairs: &[herd_engine::objective::Pair],
    (rc, rr): (&[f32], &[f32]),
    (beta, alpha): (f64, f64),
    mask_format: bool,
    share: bool,
    params: &[(String, candle_core::Var)],
    want: &serde_json::Value,
    what: &str,
) {
    check_dpo_step_padded(
        policy,
        pairs,
        (rc, rr),
        (beta, alpha),
        mask_format,
        share,
        params,
        want,
        what,
        319,
    )
}

/// `check_dpo_step` for a model whose pad token is `pad`.
#[allow(clippy::too_many_arguments)]
pub fn check_dpo_step_padded(
    policy: &herd_engine::Llama,
    pairs: &[herd_engine::objective::Pair],
    (rc, rr): (&[f32], &[f32]),
    (beta, alpha): (f64, f64),
    mask_format: bool,
    share: bool,
    params: &[(String, candle_core::Var)],
    want: &serde_json::Value,
    what: &str,
    pad: u32,
) {
    use herd_engine::objective;
    let l = objective::dpo_logps(policy, pairs, mask_format, share, pad).unwrap();
    let pc: Vec<f32> = l.chosen.to_vec1().unwrap();
    let pr: Vec<f32> = l.rejected.to_vec1().unwrap();
    for (i, ex) in want["per_example"].as_array().unwrap().iter().enumerate() {
        for (got, key) in [
            (pc[i], "policy_chosen"),
            (pr[i], "policy_rejected"),
            (rc[i], "ref_chosen"),
            (rr[i], "ref_rejected"),
        ] {
            close(
                got as f64,
                ex[key].as_f64().unwrap(),
                &format!("{what} {key}"),
            );
        }
    }
    let out = objective::dpo_loss(policy, pairs, rc, rr, beta, alpha, mask_format, pad).unwrap();
    close(
        out.dpo_loss,
        want["dpo_loss"].as_f64().unwrap(),
        &format!("{what} dpo term"),
    );
    close(
        out.nll,
        want["nll"].as_f64().unwrap(),
        &format!("{what} nll"),
    );
    close(
        out.loss.to_scalar::<f32>().unwrap() as f64,
        want["loss"].as_f64().unwrap(),
        &format!("{what} loss"),
    );
    if let Some(acc) = want["reward_accuracy"].as_f64() {
        close(
            out.reward_accuracy(),
            acc,
            &format!("{what} reward accuracy"),
        );
    }
    let grads = herd_engine::optim::gradients(&out.loss, params).unwrap();
    close(
        herd_engine::optim::global_norm(&grads).unwrap(),
        want["grad_norm"].as_f64().unwrap(),
        &format!("{what} grad norm"),
    );
    let by_name: std::collections::BTreeMap<&String, &candle_core::Tensor> =
        params.iter().map(|(n, _)| n).zip(&grads).collect();
    for (name, w) in want["grads"].as_object().unwrap() {
        let got: Vec<f32> = by_name[name].flatten_all().unwrap().to_vec1().unwrap();
        close_all(&got, &flat(w), &format!("{what} grad {name}"));
    }
}

/// The device the fixture tests run on: `HERD_TEST_DEVICE` (`cpu`, the
/// default, or `cuda:N` in a `--features cuda` build; scripts/gpu-check.sh).
pub fn device() -> candle_core::Device {
    let spec = std::env::var("HERD_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    herd_engine::device::select(&spec).unwrap_or_else(|e| panic!("HERD_TEST_DEVICE={spec}: {e}"))
}
