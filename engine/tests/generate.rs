//! Rejection sampling's generation: K continuations of each prompt off one
//! prefill give what generating each row alone gives.

use std::path::PathBuf;

use candle_core::Device;
use herd_engine::checkpoint::load_model;
use herd_engine::generate::{generate, generate_many, SamplingConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny")
}

fn prompts() -> Vec<Vec<u32>> {
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let p: Vec<u32> = e["generate"]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    vec![p.clone(), p[..6].to_vec(), p[3..].to_vec()]
}

#[test]
fn shared_prefill_greedy_equals_one_prompt_at_a_time() {
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let prompts = prompts();
    let cfg = SamplingConfig::greedy(16, vec![]);
    let many = generate_many(&model, &prompts, &[3, 0, 2], &cfg, 319).unwrap();
    assert_eq!(many.iter().map(|r| r.len()).collect::<Vec<_>>(), [3, 0, 2]);
    for (i, rows) in many.iter().enumerate() {
        let alone = generate(&model, &prompts[i..i + 1], &cfg, 319).unwrap();
        for row in rows {
            assert_eq!(row, &alone[0], "prompt {i}");
            assert_eq!(row.len(), 16);
        }
    }
    // Stop tokens end rows on their own; nothing asked, nothing run.
    let stop = many[0][0][4];
    let cfg = SamplingConfig::greedy(16, vec![stop]);
    let stopped = generate_many(&model, &prompts[..1], &[2], &cfg, 319).unwrap();
    assert_eq!(stopped[0][0], many[0][0][..5]);
    assert_eq!(
        generate_many(&model, &prompts, &[0, 0, 0], &cfg, 319).unwrap(),
        vec![Vec::<Vec<u32>>::new(); 3]
    );
}

#[test]
fn seeded_sampling_is_bit_reproducible() {
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let prompts = prompts();
    let cfg = |seed| SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        seed,
        stop_ids: vec![],
    };
    let a = generate_many(&model, &prompts, &[4, 1, 3], &cfg(7), 319).unwrap();
    let b = generate_many(&model, &prompts, &[4, 1, 3], &cfg(7), 319).unwrap();
    assert_eq!(a, b);
    let c = generate_many(&model, &prompts, &[4, 1, 3], &cfg(8), 319).unwrap();
    assert_ne!(a, c, "another seed, other samples");
    // The K samples of one prompt differ from each other.
    assert!(a[0].iter().any(|r| r != &a[0][0]), "{:?}", a[0]);
}

/// Where the fused decode kernel does not read the cache (here f64), each
/// row gets its own copy of its prompt's keys and values instead of the
/// shared prefix: the same greedy tokens as the f32 model's shared path.
#[test]
fn rows_copy_their_prompt_where_the_kernel_cannot_share_it() {
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let f64_model = herd_engine::Llama::from_tensors_dtype(
        model.config.clone(),
        model.tensors(),
        &Device::Cpu,
        candle_core::DType::F64,
    )
    .unwrap();
    let prompts = prompts();
    let cfg = SamplingConfig::greedy(16, vec![]);
    let shared = generate_many(&model, &prompts, &[3, 0, 2], &cfg, 319).unwrap();
    let copied = generate_many(&f64_model, &prompts, &[3, 0, 2], &cfg, 319).unwrap();
    assert_eq!(shared, copied);
}

/// Ten tokens at temperature 1, top-p 0.9.
fn nucleus_sampling(seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: 10,
        temperature: 1.0,
        top_p: 0.9,
        seed,
        stop_ids: vec![],
    }
}

/// Calls run side by side on the pool: one thread or two, the same tokens.
#[test]
fn sampling_does_not_depend_on_the_thread_count() {
    use herd_engine::generate::sample_many;
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let prompts = prompts();
    let cfg = nucleus_sampling(3);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| sample_many(&model, &prompts, &[3, 2, 3], &cfg, 319, 4, &|_| {}).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one.iter().map(|r| r.len()).collect::<Vec<_>>(), [3, 2, 3]);
    // rows_per_call 4 makes three calls: the first prompt's 3 rows alone.
    let alone = generate_many(&model, &prompts[..1], &[3], &cfg, 319).unwrap();
    assert_eq!(one[0], alone[0]);
}

/// Each row draws from its own stream (prompt, sample): a prompt decoded
/// alone in the first call or in the second draws the same tokens, and each
/// prompt of a call draws other tokens than it would under another index.
#[test]
fn rows_draw_from_their_own_streams() {
    use herd_engine::generate::sample_many;
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let prompts = prompts();
    let cfg = nucleus_sampling(3);
    // Calls [0] [1] [2] against [0, 1] [2]: prompt 2 alone in both.
    let three = sample_many(&model, &prompts, &[3, 2, 3], &cfg, 319, 4, &|_| {}).unwrap();
    let two = sample_many(&model, &prompts, &[3, 2, 3], &cfg, 319, 5, &|_| {}).unwrap();
    assert_eq!(three[2], two[2]);
    // The same prompt at index 0 draws from other streams.
    let first = generate_many(&model, &prompts[2..], &[3], &cfg, 319).unwrap();
    assert_ne!(first[0], three[2]);
}
