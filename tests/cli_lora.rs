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
    // An adapter herd wrote names its base by hash: it imports without --base.
    let again = q(format!(
        "import model {}",
        dir.path().join("trained").to_str().unwrap()
    ));
    assert_eq!(again, trained);

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
}
