//! Shared test helpers: where the fixtures are, and tolerant comparison.

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
