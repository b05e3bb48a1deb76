//! What the LoRA step benches share: random token rows and the timed
//! optimizer steps (a warm-up, then three; the median is what they report).

use std::time::Instant;

use herd_engine::chat::Encoded;
use herd_engine::objective;
use herd_engine::rng::Rng;
use herd_engine::train::{TrainConfig, Trainer};
use herd_engine::Llama;

/// `rows` sequences of `len` random tokens below `vocab`, every one a target.
pub fn random_rows(rows: usize, len: usize, vocab: usize) -> Vec<Encoded> {
    let mut rng = Rng::new(0);
    (0..rows)
        .map(|_| Encoded {
            ids: (0..len).map(|_| rng.below(vocab) as u32).collect(),
            target_mask: vec![1; len],
            format_mask: vec![0; len],
        })
        .collect()
}

/// Four SFT steps (AdamW on what trains) on `seqs`, each printed; the
/// median of the last three, in seconds.
pub fn median_step(model: &Llama, seqs: &[Encoded]) -> f64 {
    let mut trainer = Trainer::new(
        model.trainable_params(),
        TrainConfig {
            lr: 1e-4,
            steps: 100,
            ..Default::default()
        },
    )
    .unwrap();
    let mut times = vec![];
    for i in 0..4 {
        let t = Instant::now();
        trainer
            .step_with(
                |_| Ok(objective::sft_loss(model, seqs, 0)?.0),
                |store| model.finish_backward(store),
            )
            .unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("step {i}: {s:.2} s");
        if i > 0 {
            times.push(s);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[1]
}
