//! GGUF export: what llama.cpp-family runtimes read. In Rust: the file's
//! keys, tensor names and the q/k permutation read back with candle's GGUF
//! reader; refusals say why. Through transformers' GGUF loader (a Python
//! with torch, transformers and gguf: HERD_PYTHON, else python3; skipped
//! loudly without): logits within 1e-2 of herd's at f16, the tokenizer
//! encodes a dialog to the source's ids, the chat template is carried, and
//! q8_0's first 8 greedy tokens equal f16's.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use herd_engine::gguf::{write, GgufDtype};

/// The project's loud-skip and Python probe, shared with the root tests.
#[path = "../../tests/common/system.rs"]
#[allow(dead_code)]
mod system;

fn families() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families")
}

/// `family`'s directory, or (for `tied`) llama31 with its embeddings tied:
/// no `lm_head`, `tie_word_embeddings` true.
fn source(family: &str, scratch: &Path) -> PathBuf {
    if family != "tied" {
        return families().join(family);
    }
    let from = families().join("llama31");
    let to = scratch.join("tied");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(&from).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut tensors = herd_engine::checkpoint::load_tensors(&from).unwrap();
    tensors.remove("lm_head.weight");
    candle_core::safetensors::save(&tensors.into_iter().collect(), to.join("model.safetensors"))
        .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = true.into();
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    to
}

fn read(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    (gguf_file::Content::read(&mut f).unwrap(), f)
}

#[test]
fn keys_names_and_the_rotary_permutation_read_back() {
    for (family, tied) in [("llama31", false), ("tied", true)] {
        let dir = tempfile::tempdir().unwrap();
        let src = source(family, dir.path());
        let out = dir.path().join("m.gguf");
        write(&src, &out, GgufDtype::F16).unwrap();
        let (content, mut f) = read(&out);
        let md = &content.metadata;
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        for k in [
            "llama.context_length",
            "llama.embedding_length",
            "llama.block_count",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.chat_template",
        ] {
            assert!(md.contains_key(k), "{family}: {k}");
        }
        assert_eq!(
            content.tensor_infos.contains_key("output.weight"),
            !tied,
            "{family}"
        );
        // attn_q read back and un-permuted is the source's q_proj.
        let config = herd_engine::LlamaConfig::from_file(&src.join("config.json")).unwrap();
        let q = content
            .tensor(&mut f, "blk.0.attn_q.weight", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let (rows, cols) = q.dims2().unwrap();
        let heads = config.num_attention_heads;
        let back = q
            .reshape((heads, rows / heads / 2, 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let tensors = herd_engine::checkpoint::load_tensors(&src).unwrap();
        let want = &tensors["model.layers.0.self_attn.q_proj.weight"];
        let diff: f32 = (back - want.to_dtype(candle_core::DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-2, "{family}: q un-permuted differs by {diff}");
    }
}

#[test]
fn reward_models_and_biases_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama-tiny/rm");
    let err = write(&rm, &dir.path().join("rm.gguf"), GgufDtype::F16).unwrap_err();
    assert!(err.to_string().contains("reward model"), "{err}");
    let err = write(
        &families().join("chatml"),
        &dir.path().join("b.gguf"),
        GgufDtype::F16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("biases"), "{err}");
    assert!(!dir.path().join("rm.gguf").exists());
    assert!(!dir.path().join("b.gguf").exists());
}

const PY: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, ids = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name in ["f16", "q8_0"]:
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f"{name}.gguf", dtype=torch.float32)
    with torch.no_grad():
        out[name + "_logits"] = m(torch.tensor([ids])).logits[0].flatten().tolist()
        g = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    out[name + "_greedy"] = g[0, len(ids):].tolist()
tok = AutoTokenizer.from_pretrained(d, gguf_file="f16.gguf")
msgs = [{"role": "user", "content": "What is 1234+56?\n\n  Think."}, {"role": "assistant", "content": "It is 1290."}]
out["template"] = tok.chat_template
ids = tok.apply_chat_template(msgs, tokenize=True)
out["dialog_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
print(json.dumps(out))
"#;

#[test]
fn transformers_loads_the_gguf() {
    let Some(python) = system::python_with(
        "torch, transformers, gguf",
        "transformers_loads_the_gguf",
        "HERD_REQUIRE_GGUF",
    ) else {
        return;
    };
    for family in ["llama31", "tied", "llama2"] {
        let dir = tempfile::tempdir().unwrap();
        let src = source(family, dir.path());
        write(&src, &dir.path().join("f16.gguf"), GgufDtype::F16).unwrap();
        write(&src, &dir.path().join("q8_0.gguf"), GgufDtype::Q8_0).unwrap();
        let ids: Vec<u32> = vec![1, 5, 9, 14, 3, 7, 2, 11];
        let out = std::process::Command::new(&python)
            .args([
                "-c",
                PY,
                dir.path().to_str().unwrap(),
                &serde_json::to_string(&ids).unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{family}: transformers could not load it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        // herd's logits of the same ids from the source checkpoint.
        let model = herd_engine::checkpoint::load_model(&src, &Device::Cpu).unwrap();
        let input = Tensor::new(&ids[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want: Vec<f32> = model
            .forward(&input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = serde_json::from_value(v["f16_logits"].clone()).unwrap();
        assert_eq!(got.len(), want.len(), "{family}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-2,
            "{family}: f16 logits differ from herd's by {worst}"
        );
        assert_eq!(
            v["f16_greedy"], v["q8_0_greedy"],
            "{family}: q8_0 greedy vs f16"
        );
        // The chat template and the tokenizer came along.
        let template =
            std::fs::read_to_string(src.join("chat_template.jinja")).unwrap_or_else(|_| {
                let tc: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap(),
                )
                .unwrap();
                tc["chat_template"].as_str().unwrap().to_string()
            });
        assert_eq!(v["template"].as_str().unwrap(), template, "{family}");
        let chat = herd_engine::checkpoint::load_chat(&src).unwrap();
        let msgs = [
            // Digits, a blank line and a run of spaces, which GPT-2's and
            // Llama 3's splits cut apart differently (this fixture's small
            // vocabulary happens to merge them alike; `bpe_pre`'s unit test
            // holds the names).
            herd_engine::chat::Message::new("user", "What is 1234+56?\n\n  Think."),
            herd_engine::chat::Message::new("assistant", "It is 1290."),
        ];
        let ours = chat.encode_dialog(&msgs).unwrap().ids;
        let theirs: Vec<u32> = serde_json::from_value(v["dialog_ids"].clone()).unwrap();
        assert_eq!(theirs, ours, "{family}: the dialog's ids");
    }
}
