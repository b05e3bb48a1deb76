//! Curation at scale: the `curate` job on 100k generated SFT rows (3% of
//! them planted near-copies of earlier rows, some apologetic, some with too
//! many exclamation marks), run in-process as the worker runs it; then the
//! near-duplicate step alone, by the banded index and by the all-pairs scan
//! that curate used before (the same signatures, the same answer).
//!
//!     cargo bench -p herd-daemon --bench curate_bench [-- ROWS]
//!
//! The all-pairs scan is quadratic: on 100k rows it takes a minute or two.

use std::collections::BTreeMap;
use std::time::Instant;

use herd_daemon::jobs::{self, JobContext, JobKind, MemorySink};
use herd_engine::rng::Rng;
use serde_json::json;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    let word = |rng: &mut Rng| format!("w{}", rng.below(20_000));
    let mut texts: Vec<(String, String)> = Vec::with_capacity(n);
    let mut planted = 0;
    for i in 0..n {
        if i > 100 && rng.below(100) < 3 {
            // A near-copy of an earlier row: one word of the answer changed.
            let (p, a) = texts[rng.below(i)].clone();
            let mut w: Vec<&str> = a.split(' ').collect();
            let k = w.len() / 2;
            w[k] = "changed";
            texts.push((p, w.join(" ")));
            planted += 1;
            continue;
        }
        let prompt: Vec<String> = (0..12).map(|_| word(&mut rng)).collect();
        let mut answer: Vec<String> = (0..48).map(|_| word(&mut rng)).collect();
        match rng.below(50) {
            0 => answer.insert(0, "I'm sorry, but".into()),
            1 => answer.push("wow!!!!".into()),
            _ => {}
        }
        texts.push((prompt.join(" "), answer.join(" ")));
    }
    let path = dir.path().join("sft.jsonl");
    let mut body = String::new();
    for (p, a) in &texts {
        body += &json!({"prompt": p, "completion": a}).to_string();
        body.push('\n');
    }
    std::fs::write(&path, body).unwrap();
    println!("{n} rows ({planted} planted near-copies), 2 threads available");

    let blobs = herd_store::BlobStore::open(&dir.path().join("blobs")).unwrap();
    let mut sink = MemorySink::new(blobs);
    let mut ctx = JobContext {
        kind: JobKind::Curate,
        hyperparameters: jobs::effective_hyperparameters(JobKind::Curate, &json!({})).unwrap(),
        seed: 0,
        inputs: BTreeMap::from([("data".to_string(), path.clone())]),
        workdir: dir.path().join("work"),
        device: candle_core::Device::Cpu,
        sink: &mut sink,
    };
    let start = Instant::now();
    let summary = jobs::run(&mut ctx).unwrap();
    let job_s = start.elapsed().as_secs_f64();
    println!("curate job, banded index: {job_s:.2} s: {summary}");

    let sigs: Vec<_> = texts
        .iter()
        .map(|(p, a)| jobs::minhash(&format!("{p} {a}")))
        .collect();
    let skip = vec![false; n];
    let start = Instant::now();
    let fast = jobs::near_duplicates(&sigs, &skip, 0.8);
    let fast_s = start.elapsed().as_secs_f64();
    println!(
        "near-duplicate step, banded index: {fast_s:.2} s, {} found",
        fast.iter().filter(|d| **d).count()
    );
    let start = Instant::now();
    let slow = jobs::near_duplicates_exhaustive(&sigs, &skip, 0.8);
    let slow_s = start.elapsed().as_secs_f64();
    assert_eq!(slow, fast, "the banded index and the all-pairs scan agree");
    println!(
        "near-duplicate step, all pairs (before): {slow_s:.2} s, the same rows; the curate job before: {:.1} s (the job above with this step instead)",
        job_s - fast_s + slow_s
    );
}
