//! What an exported model carries out of herd: a model card (`README.md`
//! with Hugging Face's YAML front matter) written from the record, and, for
//! an adapter, the base named as the ecosystem knows it. herd knows a
//! model's lineage better than any tool; this is where it would otherwise
//! be lost.
//!
//! The front matter is YAML in flow style whose every value is also JSON, so
//! anything that reads YAML reads it, and so do line-by-line JSON readers.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::{ArtifactKind, ArtifactView, Client, ClientError, LineageNode, Result};

const ADAPTER_CONFIG: &str = "adapter_config.json";

fn io(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |e| ClientError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// The name PEFT, the Hub and vLLM look a base up by: `--base-name`, else
/// the name recorded at the base's import (its config's `_name_or_path` or
/// its directory's name). A base herd trained has no such name: then its
/// hash stays, and `hint` says how to make it loadable.
fn public_name(base: &ArtifactView) -> Option<String> {
    if base.produced_by.is_some() {
        return None;
    }
    base.summary["source_name"]
        .as_str()
        .map(str::to_string)
        .or_else(|| Some(base.name.clone()))
}

/// Rewrite an exported adapter's `adapter_config.json` so PEFT finds its
/// base: `base_model_name_or_path` the base's public name, herd's hash of
/// it in `herd_base_model` (what a re-import reads). Returns the name
/// written and a hint when it could not be a public one.
pub(super) fn name_adapter_base(
    c: &Client,
    dir: &Path,
    base_name: Option<&str>,
) -> Result<(String, Option<String>)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))?;
    let recorded = config["herd_base_model"]
        .as_str()
        .or_else(|| config["base_model_name_or_path"].as_str())
        .unwrap_or_default()
        .to_string();
    let base = c.artifact(&recorded, 0).ok().map(|d| d.artifact);
    let (name, hint) = match (base_name, base.as_ref().and_then(public_name)) {
        (Some(n), _) => (n.to_string(), None),
        (None, Some(n)) => (n, None),
        (None, None) => (
            recorded.clone(),
            Some(format!(
                "the adapter's base is herd's checkpoint {recorded}, which has no public name: export it too (`herd export {recorded} DIR`) and pass `--base-name DIR`"
            )),
        ),
    };
    config["base_model_name_or_path"] = json!(name);
    if !recorded.is_empty() {
        config["herd_base_model"] = json!(recorded);
    }
    let body = serde_json::to_string_pretty(&config).expect("json");
    std::fs::write(&path, body + "\n").map_err(io(&path))?;
    Ok((name, hint))
}

/// Every hash in a lineage tree, each once, in the order first met.
pub(super) fn lineage_hashes(node: &LineageNode, out: &mut Vec<String>) {
    if !out.contains(&node.hash) {
        out.push(node.hash.clone());
    }
    if let Some(job) = &node.job {
        for input in job.inputs.values() {
            lineage_hashes(input, out);
        }
    }
}

/// The imported roots of a lineage: (hash, kind, name, summary) via
/// `artifact` lookups for their recorded names.
fn roots<'a>(node: &'a LineageNode, out: &mut Vec<&'a LineageNode>) {
    match &node.job {
        None => {
            if !out.iter().any(|n| n.hash == node.hash) {
                out.push(node);
            }
        }
        Some(job) => job.inputs.values().for_each(|i| roots(i, out)),
    }
}

fn tree_lines(node: &LineageNode, depth: usize, label: &str, out: &mut Vec<String>) {
    let kind = node.artifact.map_or("artifact", |a| a.as_str());
    let what = match &node.job {
        Some(j) => format!(
            "output `{}` of {} job \"{}\" ({})",
            node.name, j.kind, j.name, j.id
        ),
        None => format!("imported as \"{}\"", node.name),
    };
    out.push(format!(
        "{}- {label}{kind} `{}`: {what}",
        "  ".repeat(depth),
        node.hash
    ));
    if let Some(j) = &node.job {
        for (name, input) in &j.inputs {
            tree_lines(input, depth + 1, &format!("{name}: "), out);
        }
    }
}

/// The `license:` of a card's front matter, if it has one.
fn license_of(card: &str) -> Option<String> {
    let body = card.strip_prefix("---")?;
    let end = body.find("\n---")?;
    body[..end].lines().find_map(|l| {
        let v = l.strip_prefix("license:")?.trim().trim_matches('"');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// Write `README.md` into an exported checkpoint or adapter directory: the
/// front matter (`base_model`, `library_name`, `tags`, `datasets`,
/// `license` from the base's own card, herd's hashes) and a body from the
/// record: the job and its round, hyperparameters, input datasets, final
/// metrics, the lineage to imported roots, the `herd reproduce` command and
/// the build it ran on. A card already there (the base's) is kept as
/// `README.base.md`.
pub(super) fn write_card(
    c: &Client,
    dir: &Path,
    artifact: &ArtifactView,
    adapter_base: Option<&str>,
) -> Result<()> {
    let readme = dir.join("README.md");
    let base_card = std::fs::read_to_string(&readme).ok();
    if base_card.is_some() {
        std::fs::rename(&readme, dir.join("README.base.md")).map_err(io(&readme))?;
    }
    let lineage = c.lineage(&artifact.hash)?;
    let mut hashes = vec![];
    lineage_hashes(&lineage, &mut hashes);
    let mut root_nodes = vec![];
    roots(&lineage, &mut root_nodes);
    let mut base_models = BTreeSet::new();
    let mut datasets = BTreeSet::new();
    let mut root_lines = vec![];
    for r in &root_nodes {
        let view = c.artifact(&r.hash, 0).ok().map(|d| d.artifact);
        match r.artifact {
            Some(ArtifactKind::Checkpoint) => {
                if let Some(n) = view.as_ref().and_then(public_name) {
                    base_models.insert(n);
                }
            }
            Some(k) if k.is_dataset() => {
                datasets.insert(r.name.clone());
                let rows = view
                    .as_ref()
                    .and_then(|v| v.summary["rows"].as_u64())
                    .map_or(String::new(), |n| format!(", {n} rows"));
                root_lines.push(format!(
                    "- `{}` ({}{rows}): `{}`",
                    r.name,
                    k.as_str(),
                    r.hash
                ));
            }
            _ => {}
        }
    }
    if let Some(b) = adapter_base {
        base_models = BTreeSet::from([b.to_string()]);
    }
    let library = if artifact.artifact == ArtifactKind::Adapter {
        "peft"
    } else {
        "transformers"
    };
    let job = match artifact.produced_by {
        Some(id) => Some(c.job(&id.to_string())?),
        None => None,
    };
    let mut tags = vec!["herd".to_string()];
    if let Some(j) = &job {
        tags.push(j.kind.to_string());
    }
    let mut front = vec!["---".to_string()];
    let one_or_list = |set: &BTreeSet<String>| match set.len() {
        1 => json!(set.iter().next()),
        _ => json!(set),
    };
    if !base_models.is_empty() {
        front.push(format!("base_model: {}", one_or_list(&base_models)));
    }
    front.push(format!("library_name: {}", json!(library)));
    front.push(format!("tags: {}", json!(tags)));
    if !datasets.is_empty() {
        front.push(format!("datasets: {}", json!(datasets)));
    }
    if let Some(l) = base_card.as_deref().and_then(license_of) {
        front.push(format!("license: {}", json!(l)));
    }
    front.push(format!(
        "herd: {}",
        json!({"artifact": artifact.hash, "kind": artifact.artifact, "lineage": hashes,
               "job": job.as_ref().map(|j| j.id)})
    ));
    front.push("---".into());

    let mut body = vec![String::new()];
    match &job {
        Some(j) => {
            body.push(format!(
                "# {} (herd {} job \"{}\")\n",
                artifact.hash, j.kind, j.name
            ));
            body.push(format!(
                "Made by job `{}` (seed {}, {} attempt(s)){}.\n",
                j.id,
                j.seed,
                j.attempts,
                j.round
                    .map_or(String::new(), |r| format!(", in round `{r}`"))
            ));
            body.push("## Hyperparameters (effective)\n".into());
            body.push("```json".into());
            body.push(serde_json::to_string_pretty(&j.effective_hyperparameters).expect("json"));
            body.push("```\n".into());
            if !j.last_metrics.is_empty() {
                body.push("## Final metrics\n".into());
                body.push("| metric | step | value |\n|---|---|---|".into());
                for (name, (step, v)) in &j.last_metrics {
                    body.push(format!("| {name} | {step} | {v} |"));
                }
                body.push(String::new());
            }
        }
        None => body.push(format!("# {} (imported into herd)\n", artifact.hash)),
    }
    if !root_lines.is_empty() {
        body.push("## Datasets\n".into());
        body.extend(root_lines);
        body.push(String::new());
    }
    body.push("## Lineage (to imported roots)\n".into());
    let mut tree = vec![];
    tree_lines(&lineage, 0, "", &mut tree);
    body.extend(tree);
    body.push(String::new());
    if let Some(j) = &job {
        body.push("## Reproduce\n".into());
        body.push(format!(
            "```sh\nherd reproduce {}\n```\n\nThe same inputs, hyperparameters, seed and thread count give the same bytes on a CPU.\n",
            j.id
        ));
        if !j.fingerprint.is_empty() {
            body.push("## Build and machine\n".into());
            for (k, v) in &j.fingerprint {
                body.push(format!("- {k}: `{v}`"));
            }
            body.push(String::new());
        }
    }
    if base_card.is_some() {
        body.push(
            "The base model's own card is kept beside this one as `README.base.md`.\n".into(),
        );
    }
    let text = front.join("\n") + "\n" + &body.join("\n");
    std::fs::write(&readme, text).map_err(io(&readme))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_license_is_read_from_front_matter() {
        assert_eq!(
            super::license_of("---\nlicense: apache-2.0\ntags: [a]\n---\n# x"),
            Some("apache-2.0".into())
        );
        assert_eq!(super::license_of("# no front matter\nlicense: x"), None);
    }
}
