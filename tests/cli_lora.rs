//! LoRA adapters through the CLI, against PEFT.

mod common;

use common::*;
use serde_json::Value;

/// The tensors of a safetensors file: name -> shape.
fn tensor_shapes(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect()
}

/// A PEFT adapter through the CLI: imported against its base, trained on
/// by sft and dpo (the reference: the base with the adapter off) from the
/// fixture's first step, exported as PEFT lays it out, merged into a plain
/// checkpoint equal to PEFT's merge; and the refusals a user meets.
#[test]
fn lora_adapter_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let cli = Cli { d: &d };
    // `herd -q` with a command line split at spaces.
    let q = |line: String| cli.quiet(&line.split(' ').collect::<Vec<_>>());
    let raw = |line: String| {
        let out = cli.raw(&line.split(' ').collect::<Vec<_>>());
        assert!(!out.status.success(), "{line} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let f = fixtures();
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("lora/expected.json")).unwrap())
            .unwrap();
    let fx = |name: &str| f.join(name).to_str().unwrap().to_string();
    let base = q(format!("import model {}", fx("ref")));
    let policy = q(format!("import model {}", fx("policy")));
    let adapter_dir = f.join("lora/adapter");

    // Without its base, an adapter is refused, saying how to give it.
    let err = raw(format!("import model {}", fx("lora/adapter")));
    assert!(err.contains("--base"), "{err}");

    let adapter = q(format!("import model {} --base {base}", fx("lora/adapter")));
    let shown = cli.json(&["show", &adapter]);
    assert_eq!(shown["artifact"]["artifact"], "adapter", "{shown}");
    assert_eq!(shown["artifact"]["summary"]["base"], base.as_str());
    assert_eq!(shown["artifact"]["summary"]["rank"], 4);
    let sft = q(format!("import dataset {} --kind sft", fx("sft.jsonl")));
    let prefs = q(format!(
        "import dataset {} --kind preference",
        fx("preferences.jsonl")
    ));

    // sft and dpo continue the adapter: step 1 is the fixture's (sft with
    // the fixture's optimizer step: AdamW at 1e-2, no clipping).
    let last = |job: &str, metric: &str| -> f64 {
        let j = cli.json(&["show", job]);
        assert_eq!(j["status"], "succeeded", "{j}");
        j["last_metrics"][metric][1].as_f64().unwrap()
    };
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{what}: {a} vs {b}"
        )
    };
    let sft_job = q(format!(
        "submit --kind sft --input model={base} --input adapter={adapter} --input data={sft} \
         --set steps=1 --set batch_size=3 --set lr=1e-2 --set grad_clip=0 --wait"
    ));
    close(
        last(&sft_job, "loss"),
        e["sft"]["loss"].as_f64().unwrap(),
        "lora sft loss",
    );
    assert_eq!(last(&sft_job, "lr"), 1e-2);
    let dpo_job = q(format!(
        "submit --kind dpo --input model={base} --input adapter={adapter} --input data={prefs} \
         --set steps=1 --set batch_size=3 --set min_strength=slightly_better --wait"
    ));
    close(
        last(&dpo_job, "loss"),
        e["dpo"]["loss"].as_f64().unwrap(),
        "lora dpo loss",
    );

    // What they made is an adapter of the same base, laid out as PEFT's.
    let j = cli.json(&["show", &sft_job]);
    assert!(j["outputs"].get("checkpoint").is_none(), "{j}");
    let trained = j["outputs"]["adapter"].as_str().unwrap().to_string();
    assert_eq!(
        cli.json(&["show", &trained])["artifact"]["summary"]["base"],
        base.as_str()
    );
    let want = tensor_shapes(&adapter_dir.join("adapter_model.safetensors"));
    for (hash, to) in [(&adapter, "imported"), (&trained, "trained")] {
        let out = dir.path().join(to);
        cli.json(&["export", hash, out.to_str().unwrap()]);
        assert_eq!(
            tensor_shapes(&out.join("adapter_model.safetensors")),
            want,
            "{to}"
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["r"], 4, "{to}");
        assert_eq!(config["lora_alpha"], 8.0, "{to}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("imported/adapter_model.safetensors")).unwrap(),
        std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap(),
        "the imported adapter comes back byte for byte"
    );
    // Exported, an adapter names its base as PEFT looks it up (the name
    // recorded at the base's import, here its directory's) and keeps herd's
    // hash of it beside; re-imported, it keeps its recorded base.
    let config: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("trained/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["base_model_name_or_path"], "ref", "{config}");
    assert_eq!(config["herd_base_model"], base.as_str(), "{config}");
    let again = q(format!(
        "import model {}",
        dir.path().join("trained").to_str().unwrap()
    ));
    assert_eq!(
        cli.json(&["show", &again])["artifact"]["summary"]["base"],
        base.as_str()
    );
    // --base-name says where PEFT should find it; --as-recorded writes the
    // recorded bytes (the base named by hash), which import to the same hash.
    let named = dir.path().join("named");
    let where_base = fx("ref");
    cli.json(&[
        "export",
        &trained,
        named.to_str().unwrap(),
        "--base-name",
        &where_base,
    ]);
    let config: Value =
        serde_json::from_slice(&std::fs::read(named.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["base_model_name_or_path"], where_base.as_str());
    let exact = dir.path().join("exact");
    cli.json(&["export", &trained, exact.to_str().unwrap(), "--as-recorded"]);
    assert!(!exact.join("README.md").exists());
    let again = q(format!("import model {}", exact.to_str().unwrap()));
    assert_eq!(again, trained);
    peft_loads_alone(&named, &trained, &cli);

    // A job reference to a LoRA job's checkpoint is refused at submit, and
    // so is an adapter given with a model it does not adapt.
    let err = raw(format!(
        "submit --kind sft --input model=job:{sft_job}/checkpoint --input data={sft}"
    ));
    assert!(
        err.contains("makes no output `checkpoint` (it makes: adapter)"),
        "{err}"
    );
    let err = raw(format!(
        "submit --kind sft --input model={policy} --input adapter={adapter} --input data={sft}"
    ));
    assert!(
        err.contains(&format!("adapter of checkpoint {base}")),
        "{err}"
    );

    // merge of the adapter after that step: a plain checkpoint with PEFT's
    // merged weights, and its base's files.
    let merge_job = q(format!(
        "submit --kind merge --input model={base} --input adapter={trained} --wait"
    ));
    let merged = cli.json(&["show", &merge_job])["outputs"]["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let out = dir.path().join("merged");
    cli.json(&["export", &merged, out.to_str().unwrap()]);
    assert!(out.join("tokenizer.json").exists());
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let name = e["merged"]["tensor"].as_str().unwrap();
    let got: Vec<f32> = tensors[name].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = serde_json::from_value::<Vec<Vec<f32>>>(e["merged"]["weight"].clone())
        .unwrap()
        .concat();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
            "merged {name}: {a} vs {b}"
        );
    }

    // The merged checkpoint as GGUF for llama.cpp; an adapter is refused
    // with the way to merge it, a reward model with the reason.
    let gguf = dir.path().join("merged.gguf");
    let done = cli.json(&["export", &merged, gguf.to_str().unwrap(), "--dtype", "q8_0"]);
    assert_eq!(done["format"], "gguf", "{done}");
    assert!(std::fs::read(&gguf).unwrap().starts_with(b"GGUF"));
    let err = raw(format!(
        "export {trained} {} --format gguf",
        dir.path().join("a.gguf").display()
    ));
    assert!(err.contains("merge it into its base first"), "{err}");
    let rm = q(format!("import model {}", fx("rm")));
    let err = raw(format!(
        "export {rm} {}",
        dir.path().join("rm.gguf").display()
    ));
    assert!(err.contains("reward model"), "{err}");
    assert!(!dir.path().join("rm.gguf").exists());

    // A base that came with its own card: the export keeps it beside
    // herd's as README.base.md, and herd's carries its license.
    let carded = dir.path().join("carded-base");
    std::fs::create_dir_all(&carded).unwrap();
    for f in std::fs::read_dir(f.join("ref")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, carded.join(f.file_name().unwrap())).unwrap();
    }
    let own = "---\nlicense: apache-2.0\n---\n# The base's own card\n";
    std::fs::write(carded.join("README.md"), own).unwrap();
    let with_card = q(format!("import model {}", carded.display()));
    let out = dir.path().join("carded-out");
    cli.json(&["export", &with_card, out.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(out.join("README.base.md")).unwrap(),
        own
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("\nlicense: \"apache-2.0\"\n"), "{card}");
    assert!(card.contains("README.base.md"), "{card}");
}

/// PEFT's one-liner finds the exported adapter's base by the name herd
/// wrote, and gives herd's logits. Needs a Python with torch, transformers
/// and peft: `HERD_PYTHON` (else `python3`); without one it says loudly
/// that it skipped.
fn peft_loads_alone(dir: &std::path::Path, adapter: &str, cli: &Cli) {
    let Some(python) = common::system::python_with(
        "torch, transformers, peft",
        "peft_loads_alone",
        "HERD_REQUIRE_PEFT",
    ) else {
        return;
    };
    // herd's logits of a fixed prompt through the adapter.
    let ids = [1u32, 5, 9, 14, 3, 7];
    let shown = cli.json(&["show", adapter]);
    let base = shown["artifact"]["summary"]["base"]
        .as_str()
        .unwrap()
        .to_string();
    let base_dir = dir.parent().unwrap().join("base-for-herd");
    cli.json(&["export", &base, base_dir.to_str().unwrap(), "--as-recorded"]);
    let mut model =
        herd_engine::checkpoint::load_model(&base_dir, &candle_core::Device::Cpu).unwrap();
    herd_engine::checkpoint::load_adapter(&mut model, dir).unwrap();
    let input = candle_core::Tensor::new(&ids[..], &candle_core::Device::Cpu)
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
    let script = format!(
        "import json, torch\nfrom peft import AutoPeftModelForCausalLM\nm = AutoPeftModelForCausalLM.from_pretrained({dir:?}, torch_dtype=torch.float32)\nwith torch.no_grad(): out = m(torch.tensor([{ids:?}])).logits[0]\nprint(json.dumps(out.flatten().tolist()))",
        dir = dir.to_str().unwrap(),
        ids = ids,
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PEFT could not load the export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<f32> = serde_json::from_slice(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "PEFT's logits differ from herd's by {worst}");
}
