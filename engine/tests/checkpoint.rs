//! Checkpoints: configs old and new, tied embeddings, shards, bf16, clear
//! errors for bad inputs, and bit-identical training runs.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use herd_engine::chat::Message;
use herd_engine::checkpoint::{load_model, load_tensors, save_model, save_tensors};
use herd_engine::config::LlamaConfig;
use herd_engine::objective;
use herd_engine::optim::gradients;
use herd_engine::train::{TrainConfig, Trainer};
use herd_engine::{EngineError, Llama};

fn tiny_config(tie: bool) -> LlamaConfig {
    let mut c = LlamaConfig::from_file(&fixtures().join("ref/config.json")).unwrap();
    c.tie_word_embeddings = tie;
    c.num_attention_heads = 2;
    c.num_key_value_heads = 1;
    c.head_dim = 32;
    c
}

#[test]
fn old_and_new_config_keys_agree() {
    let dir = fixtures().join("ref/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dir).unwrap()).unwrap();
    let both = LlamaConfig::from_json(&v, "both").unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.remove("dtype");
    obj.remove("head_dim");
    let old = LlamaConfig::from_json(&v, "old").unwrap();
    assert_eq!(both, old);
    // Newer spelling only.
    let mut new =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&dir).unwrap()).unwrap();
    let obj = new.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.remove("torch_dtype");
    obj.remove("rope_scaling");
    assert_eq!(LlamaConfig::from_json(&new, "new").unwrap(), both);
    // Llama 3 scaling via rope_scaling (old) and rope_parameters (new).
    let mut s = v.clone();
    s["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let a = LlamaConfig::from_json(&s, "s").unwrap();
    assert_eq!(a.rope_scaling.as_ref().unwrap().factor(), 8.0);
    let round = LlamaConfig::from_json(&a.to_hf_json(), "round").unwrap();
    assert_eq!(round, a);
}

#[test]
fn bad_configs_name_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref/config.json")).unwrap())
            .unwrap();
    let cases = [
        ("hidden_size", serde_json::json!("big"), "hidden_size"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "num_key_value_heads",
        ),
        ("model_type", serde_json::json!("gpt2"), "model_type"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "longrope", "factor": 2.0}),
            "rope_type",
        ),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 2.0}),
            "original_max_position_embeddings",
        ),
        (
            "architectures",
            serde_json::json!(["GemmaForCausalLM"]),
            "architectures",
        ),
        ("model_type", serde_json::json!("mixtral"), "model_type"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("dtype", serde_json::json!("int8"), "dtype"),
    ];
    for (key, value, field) in cases {
        let mut v = base.clone();
        v[key] = value;
        if key == "dtype" {
            v.as_object_mut().unwrap().remove("torch_dtype");
        }
        let err = LlamaConfig::from_json(&v, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains(field),
            "{key}: {err}"
        );
    }
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("vocab_size");
    assert!(LlamaConfig::from_json(&v, "c")
        .unwrap_err()
        .to_string()
        .contains("vocab_size"));
}

#[test]
fn missing_files_and_wrong_shapes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        fixtures().join("ref/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
    // Right file, wrong config: the tensor and both shapes are named.
    std::fs::copy(
        fixtures().join("ref/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    c["intermediate_size"] = 100.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let err = load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp") && err.contains("100"), "{err}");
}

#[test]
fn tied_model_round_trips_and_shards_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::init(tiny_config(true), 7, &Device::Cpu).unwrap();
    save_model(&model, dir.path(), Some(&fixtures().join("ref"))).unwrap();
    let names: Vec<String> = load_tensors(dir.path()).unwrap().into_keys().collect();
    assert!(
        !names.contains(&"lm_head.weight".to_string()),
        "tied: no lm_head saved"
    );
    let back = load_model(dir.path(), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[312u32, 5, 6, 7]], &Device::Cpu).unwrap();
    let a: Vec<f32> = model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = back
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    // Split into two shards with an index, as large checkpoints are.
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    let all = model.tensors();
    let (mut s1, mut s2) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (i, (n, t)) in all.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut s1, "model-00001-of-00002.safetensors")
        } else {
            (&mut s2, "model-00002-of-00002.safetensors")
        };
        shard.insert(n.clone(), t.clone());
        map.insert(n.clone(), file.into());
    }
    save_tensors(
        &s1,
        DType::F32,
        &sharded.path().join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    save_tensors(
        &s2,
        DType::F32,
        &sharded.path().join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let c: Vec<f32> = load_model(sharded.path(), &Device::Cpu)
        .unwrap()
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, c);
}

#[test]
fn bf16_checkpoints_load_and_save_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config(false);
    cfg.dtype = "bfloat16".into();
    let model = Llama::init(cfg, 3, &Device::Cpu).unwrap();
    save_model(&model, dir.path(), None).unwrap();
    let raw =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(raw.values().all(|t| t.dtype() == DType::BF16));
    let back = load_model(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.embed_tokens.dtype(), DType::F32, "trains in f32");
    let x = model
        .embed_tokens
        .as_tensor()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (x - back.embed_tokens.as_tensor())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_cut_graph_is_an_error_not_a_silent_zero() {
    let model = load_model(&fixtures().join("ref"), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[312u32, 5, 6, 7]], &Device::Cpu).unwrap();
    // candle-nn's fused softmax has no backward: the graph stops there.
    let logits = model.forward(&ids).unwrap();
    let fused = candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .sum_all()
        .unwrap();
    let err = gradients(&fused, &model.params()).unwrap_err();
    assert!(matches!(err, EngineError::NoGradient(_)), "{err}");
}

/// Train 4 steps of 2 micro-batches; `width` > 1 runs them side by side on
/// a pool of `width` threads.
fn train_once(dir: &std::path::Path, width: usize) -> Vec<u8> {
    let chat = herd_engine::checkpoint::load_chat(&fixtures().join("ref")).unwrap();
    let model = Llama::init(tiny_config(false), 11, &Device::Cpu).unwrap();
    let data: Vec<_> = [
        "Compute 17 + 25.",
        "What is the capital of France?",
        "Write a short poem.",
    ]
    .iter()
    .zip(["The answer is 42.", "Paris.", "The sea and the sky."])
    .map(|(q, a)| {
        chat.encode_dialog(&[Message::new("user", q), Message::new("assistant", a)])
            .unwrap()
    })
    .collect();
    let cfg = TrainConfig {
        lr: 1e-3,
        steps: 4,
        warmup_steps: 1,
        grad_accum: 2,
        weight_decay: 0.1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(model.params(), cfg).unwrap();
    let mut losses = vec![];
    let micro = |i: usize| Ok(objective::sft_loss(&model, &data[i..i + 2], chat.special.pad)?.0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(width)
        .build()
        .unwrap();
    for _ in 0..4 {
        let s = if width > 1 {
            pool.install(|| trainer.step_parallel(width, micro, |_| Ok(())))
        } else {
            trainer.step(micro)
        };
        losses.push(s.unwrap().loss);
    }
    assert!(losses[3] < losses[0], "loss falls: {losses:?}");
    save_model(&model, dir, None).unwrap();
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn training_twice_gives_bit_identical_weights() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = train_once(a.path(), 1);
    let second = train_once(b.path(), 1);
    assert!(first == second, "checkpoints differ between identical runs");
}

/// Micro-batches side by side sum their gradients in order: the same bits
/// as one after another.
#[test]
fn parallel_micro_batches_give_the_sequential_weights() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(
        train_once(a.path(), 1) == train_once(b.path(), 2),
        "side-by-side micro-batches changed the checkpoint"
    );
}

#[test]
fn nan_loss_stops_with_the_step() {
    let model = Llama::init(tiny_config(false), 1, &Device::Cpu).unwrap();
    let mut trainer = Trainer::new(model.params(), TrainConfig::default()).unwrap();
    let ids = Tensor::new(&[[312u32, 5, 6, 7]], &Device::Cpu).unwrap();
    trainer
        .step(|_| Ok(model.forward(&ids)?.sqr()?.mean_all()?))
        .unwrap();
    let err = trainer
        .step(|_| Ok((model.forward(&ids)?.mean_all()? * f64::NAN)?))
        .unwrap_err();
    assert!(
        matches!(err, EngineError::NonFinite { step: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 2"));
}

#[test]
fn byte_tokenizer_round_trips_text_and_has_the_specials() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, herd_engine::chat::byte_tokenizer_json().to_string()).unwrap();
    let chat = herd_engine::chat::ChatFormat::from_file(&path).unwrap();
    assert_eq!(chat.tokenizer.get_vocab_size(true), 264);
    let text = "Compute 17 + 25. Ünïcode\n\nok";
    let ids = chat.text(text).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    assert_eq!(chat.decode(&ids).unwrap(), text);
    let enc = chat
        .encode_dialog(&[Message::new("user", "hi"), Message::new("assistant", "yo")])
        .unwrap();
    assert_eq!(enc.ids[0], 256);
    assert_eq!(*enc.ids.last().unwrap(), chat.special.eos.unwrap());
}

/// Import checks a checkpoint from its headers alone: the same summary as
/// loading it, and the same clear errors for what would not load.
#[test]
fn inspect_reads_headers_only_and_agrees_with_loading() {
    use herd_engine::checkpoint::{describe, inspect};
    let src = fixtures().join("ref");
    assert_eq!(inspect(&src).unwrap(), describe(&src).unwrap());
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    inspect(dir.path()).unwrap();
    // A file cut short: the header promises bytes the file does not hold.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("past the end"), "{err}");
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("safetensors"), "{err}");
    // Right weights, wrong config: the tensor and both shapes are named.
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    c["intermediate_size"] = 100.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let err = inspect(dir.path()).unwrap_err().to_string();
    assert!(err.contains("mlp") && err.contains("100"), "{err}");
}

/// Dynamic NTK RoPE is the default up to max_position_embeddings (where
/// transformers computes it so, statelessly) and refused past it; a
/// sliding window (Mistral) refuses sequences longer than the window.
#[test]
fn dynamic_rope_and_sliding_windows_hold_where_herd_computes_them_exactly() {
    let mut plain = tiny_config(false);
    plain.max_position_embeddings = 12;
    let mut dynamic = plain.clone();
    dynamic.rope_scaling = Some(herd_engine::config::RopeScaling::Dynamic { factor: 2.0 });
    let dev = candle_core::Device::Cpu;
    let a = Llama::init(plain.clone(), 3, &dev).unwrap();
    let b = Llama::from_tensors(dynamic, a.tensors(), &dev).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2, 7, 3, 3, 8, 1, 4, 6, 2]], &dev).unwrap();
    let la: Vec<f32> = a
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lb: Vec<f32> = b
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(la, lb);
    let longer = candle_core::Tensor::new(&[[1u32; 13]], &dev).unwrap();
    let err = b.forward(&longer).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");

    let mut windowed = plain;
    windowed.arch = herd_engine::config::Arch::Mistral;
    windowed.sliding_window = Some(8);
    let w = Llama::from_tensors(windowed, a.tensors(), &dev).unwrap();
    let err = w.forward(&ids).unwrap_err().to_string();
    assert!(err.contains("sliding window (8)"), "{err}");
    w.forward(&ids.narrow(1, 0, 8).unwrap()).unwrap();
}
