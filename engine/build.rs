//! Stamps the engine with a hash of the sources its numbers depend on (the
//! engine's own and the vendored candle-core's), so that each job records
//! exactly which kernels produced it: a constant version string did not
//! change when kernel changes moved the numbers.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
            out.push(p);
        }
    }
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let roots = [
        here.join("src"),
        here.join("Cargo.toml"),
        here.join("../vendor/candle-core/src"),
        here.join("../vendor/candle-core/Cargo.toml"),
    ];
    let mut all = vec![];
    for r in &roots {
        println!("cargo:rerun-if-changed={}", r.display());
        if r.is_dir() {
            files(r, &mut all);
        } else if r.is_file() {
            all.push(r.clone());
        }
    }
    // Sorted by the path below the repository root: the same sources hash
    // the same wherever the checkout lives.
    let base = here.parent().unwrap_or(&here).to_path_buf();
    let mut named: Vec<(String, PathBuf)> = all
        .into_iter()
        .map(|p| {
            let canon = p.canonicalize().unwrap_or(p.clone());
            let rel = canon
                .strip_prefix(&base)
                .unwrap_or(&canon)
                .display()
                .to_string();
            (rel, p)
        })
        .collect();
    named.sort();
    let mut h = Sha256::new();
    for (rel, p) in &named {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo:rustc-env=HERD_ENGINE_SOURCE_HASH={}", &hex[..16]);
}
