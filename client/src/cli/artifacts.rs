//! Commands about artifacts: import, list, show (a dataset's first rows as
//! a dialog), export (a checkpoint as a Hugging Face directory, a dataset
//! as JSONL), lineage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::render::{print, short};
use super::ImportWhat;
use crate::{
    ArtifactKind, ArtifactQuery, ArtifactView, Client, ClientError, LineageNode, ListedArtifact,
    Result,
};

pub(super) fn import(c: &Client, what: &ImportWhat, js: bool, quiet: bool) -> Result<()> {
    let file_name = |p: &Path, default: &str| {
        p.file_name()
            .and_then(|s| s.to_str())
            .unwrap_or(default)
            .to_string()
    };
    let v = match what {
        ImportWhat::Dataset { file, kind, name } => {
            let name = name.clone().unwrap_or_else(|| file_name(file, "dataset"));
            c.import_dataset(file, kind, &name)?
        }
        ImportWhat::Verifier { file, name } => {
            let name = name.clone().unwrap_or_else(|| file_name(file, "verifier"));
            c.import_verifier(file, &name)?
        }
        ImportWhat::Model {
            dir,
            name,
            base,
            chat_template,
            add_special_tokens,
        } => {
            let name = name.clone().unwrap_or_else(|| file_name(dir, "model"));
            let imported = match base {
                Some(base) => c.import_adapter(dir, &name, base)?,
                None => c.import_model(dir, &name)?,
            };
            match chat_template {
                None => imported,
                Some(t) => {
                    if !quiet && !js {
                        println!("{}", imported.hash);
                    }
                    with_chat_format(c, &imported.hash, &name, t, *add_special_tokens)?
                }
            }
        }
    };
    print(js, &v, || {
        println!("{}", v.hash);
        if !quiet {
            print_summary(&v.summary);
        }
    });
    Ok(())
}

/// Run a `chat_format` job on an imported checkpoint and wait: the new
/// checkpoint, recorded with the import as its parent.
fn with_chat_format(
    c: &Client,
    hash: &str,
    name: &str,
    template: &str,
    add_special_tokens: bool,
) -> Result<crate::Imported> {
    let path = Path::new(template);
    let text = if is_builtin_template(template) {
        template.to_string()
    } else {
        std::fs::read_to_string(path).map_err(|e| ClientError::Io {
            path: path.display().to_string(),
            source: e,
        })?
    };
    let mut req = herd_core::wire::JobRequest::new(herd_core::JobKind::ChatFormat);
    req.inputs
        .insert("model".into(), hash.parse().map_err(ClientError::Decode)?);
    req.hyperparameters = json!({"template": text, "add_special_tokens": add_special_tokens});
    req.name = Some(format!("{name}-chat-format"));
    let id = c.submit(&req)?.id;
    let job = c.wait(&id.to_string(), std::time::Duration::from_secs(24 * 3600))?;
    let out = match (&job.status, job.outputs.get("checkpoint")) {
        (crate::JobStatus::Succeeded, Some(h)) => h.clone(),
        _ => {
            return Err(ClientError::Api {
                status: 422,
                message: format!(
                    "chat_format job {id} did not succeed: {}",
                    job.error.as_deref().unwrap_or("no checkpoint")
                ),
            })
        }
    };
    Ok(crate::Imported {
        hash: out.to_string(),
        summary: job.summary.clone(),
    })
}

/// Whether `t` names a template herd carries (the daemon checks again).
fn is_builtin_template(t: &str) -> bool {
    matches!(t, "llama3" | "chatml")
}

/// A dataset's or checkpoint's summary, a few lines.
fn print_summary(s: &Value) {
    if let Some(base) = s.get("base").and_then(|b| b.as_str()) {
        println!(
            "  LoRA adapter of {base}: rank {}, alpha {}, {} parameters, targets {}",
            s["rank"], s["alpha"], s["parameters"], s["targets"]
        );
        return;
    }
    if let Some(p) = s.get("parameters") {
        println!(
            "  {} parameters, {} layers, hidden {}, vocab {}, {}",
            p,
            s["layers"],
            s["hidden_size"],
            s["vocab_size"],
            s["dtype"].as_str().unwrap_or("unknown dtype")
        );
        if let Some(a) = s["architecture"].as_str() {
            println!("  {a}");
        }
        match s.get("chat") {
            Some(Value::Object(c)) => {
                let text = |k: &str| {
                    c.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("none")
                        .to_string()
                };
                let stops: Vec<String> = c
                    .get("stops")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect();
                println!(
                    "  chat template {}; bos {}, eos {}, pad {}; stops at {}",
                    text("template"),
                    text("bos"),
                    text("eos"),
                    text("pad"),
                    stops.join(" ")
                );
            }
            Some(Value::Null) => println!(
                "  no chat template (plain-text rows only; give it one with --chat-template)"
            ),
            _ => {}
        }
        for (n, shape) in s["shapes"].as_object().into_iter().flatten().take(6) {
            println!("    {n}: {shape}");
        }
        return;
    }
    println!(
        "  {} rows of {}",
        s["rows"],
        s["kind"].as_str().unwrap_or("unknown kind")
    );
    if let Some(h) = s.get("strength").and_then(|h| h.as_object()) {
        let parts: Vec<String> = h.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  strength: {}", parts.join(" "));
        println!(
            "  3-response share: {:.2}",
            s["three_response_share"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(notes) = s.get("notes").and_then(|n| n.as_array()) {
        for n in notes {
            println!("  note: {}", n.as_str().unwrap_or_default());
        }
    }
}

pub(super) fn list(c: &Client, q: &ArtifactQuery, js: bool) -> Result<()> {
    let list = c.artifacts(q)?;
    // A job output is named by its maker (`my-exp/0/sft.checkpoint`), in
    // full; the maker's id as the shortest prefix that tells it apart here
    // (ids of one round share their first 12 characters: the time).
    let ids: Vec<String> = list
        .iter()
        .filter_map(|a| a.made_by.as_ref().map(|m| m.job.to_string()))
        .collect();
    let name = |a: &ListedArtifact| {
        a.made_by
            .as_ref()
            .map_or(a.artifact.name.clone(), |m| m.label.clone())
    };
    let width = list
        .iter()
        .map(|a| name(a).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    print(js, &json!(list), || {
        println!(
            "{:<12}  {:<10} {:<width$}  {:<14}  what",
            "hash", "kind", "name", "made by"
        );
        for a in &list {
            let by = a.made_by.as_ref().map_or("import".to_string(), |m| {
                format!("{} {}", m.kind, unique_prefix(&m.job.to_string(), &ids))
            });
            println!(
                "{:<12}  {:<10} {:<width$}  {:<14}  {}",
                short(&a.artifact.hash),
                a.artifact.artifact.as_str(),
                name(a),
                by,
                one_line(&a.artifact.summary)
            );
        }
    });
    Ok(())
}

/// The shortest start of `id` (8 characters at least, what `herd` resolves)
/// that no other of `all` shares.
fn unique_prefix(id: &str, all: &[String]) -> String {
    let mut n = 8;
    while n < id.len() && all.iter().any(|o| o != id && o.starts_with(&id[..n])) {
        n += 1;
    }
    id[..n].to_string()
}

fn one_line(s: &Value) -> String {
    if let Some(p) = s.get("parameters") {
        return format!("{p} parameters");
    }
    match s.get("rows") {
        Some(r) => format!("{r} rows"),
        None => String::new(),
    }
}

pub(super) fn show(c: &Client, hash: &str, rows: usize, js: bool) -> Result<()> {
    let d = c.artifact(hash, rows)?;
    print(js, &json!(d), || {
        let a: &ArtifactView = &d.artifact;
        println!("{} {} ({})", a.artifact.as_str(), a.name, a.hash);
        match a.produced_by {
            Some(j) => println!("  made by job {j}"),
            None => println!("  imported"),
        }
        print_summary(&a.summary);
        for (i, row) in d.rows.iter().enumerate() {
            println!("\n  row {}:", i + 1);
            print_row(row);
        }
    });
    Ok(())
}

/// One dataset row as a dialog: messages as `role: text`, other fields by name.
fn print_row(row: &Value) {
    let clip = |s: &str| {
        let s = s.replace('\n', " ⏎ ");
        if s.chars().count() > 160 {
            format!("{}…", s.chars().take(160).collect::<String>())
        } else {
            s
        }
    };
    for (k, v) in row.as_object().into_iter().flatten() {
        match v {
            Value::Array(turns) if turns.iter().all(|t| t.get("role").is_some()) => {
                println!("    {k}:");
                for t in turns {
                    println!(
                        "      {}: {}",
                        t["role"].as_str().unwrap_or("?"),
                        clip(t["content"].as_str().unwrap_or_default())
                    );
                }
            }
            Value::String(s) => println!("    {k}: {}", clip(s)),
            other => println!("    {k}: {}", clip(&other.to_string())),
        }
    }
}

/// A checkpoint to a directory, a dataset to a JSONL file; never over
/// something that exists unless `force`.
/// How `herd export` writes.
pub(super) struct ExportAs<'a> {
    pub force: bool,
    pub base_name: Option<&'a str>,
    pub as_recorded: bool,
    /// GGUF with this dtype, instead of the recorded files.
    pub gguf: Option<&'a str>,
}

pub(super) fn export(c: &Client, hash: &str, to: &PathBuf, how: &ExportAs, js: bool) -> Result<()> {
    let force = how.force;
    let a = c.artifact(hash, 0)?.artifact;
    if how.base_name.is_some() && a.artifact != ArtifactKind::Adapter {
        return Err(ClientError::Usage(format!(
            "--base-name names an adapter's base, and {hash} is a {}",
            a.artifact
        )));
    }
    let exists = |p: &Path| match std::fs::read_dir(p) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => p.exists(),
    };
    if exists(to) && !force {
        return Err(ClientError::Usage(format!(
            "{} exists and is not empty; pass --force to overwrite",
            to.display()
        )));
    }
    if let Some(dtype) = how.gguf {
        let bytes = write_whole(to, "gguf.partial", |out| c.export_gguf(hash, dtype, out))?;
        print(
            js,
            &json!({"file": to, "bytes": bytes, "format": "gguf", "dtype": dtype}),
            || println!("wrote {} ({dtype} GGUF, {bytes} bytes)", to.display()),
        );
        return Ok(());
    }
    if a.artifact.is_directory() {
        let files = c.export(hash, to)?;
        let mut base = None;
        let mut hint = None;
        if !how.as_recorded {
            if a.artifact == ArtifactKind::Adapter {
                let (name, h) = super::card::name_adapter_base(c, to, how.base_name)?;
                (base, hint) = (Some(name), h);
            }
            super::card::write_card(c, to, &a, base.as_deref())?;
        }
        let summary =
            json!({"dir": to, "files": files, "base_model": base, "card": !how.as_recorded});
        print(js, &summary, || {
            println!(
                "wrote {} files to {}{}",
                files.len(),
                to.display(),
                if how.as_recorded {
                    ""
                } else {
                    " and a model card (README.md)"
                }
            );
            if let Some(b) = &base {
                println!("PEFT finds its base as {b:?}");
            }
        });
        if let Some(h) = hint {
            eprintln!("note: {h}");
        }
        return Ok(());
    }
    // Renamed into place once the bytes hashed right.
    let bytes = write_whole(to, "partial", |out| c.download(hash, out))?;
    print(js, &json!({"file": to, "bytes": bytes}), || {
        println!(
            "wrote {} ({} dataset, {bytes} bytes) to {}",
            a.name,
            a.artifact.as_str(),
            to.display()
        )
    });
    Ok(())
}

/// Write a file whole or not at all: into `to` with `partial_ext`, synced,
/// then renamed to `to`; removed if anything fails. Its size.
fn write_whole(
    to: &Path,
    partial_ext: &str,
    fill: impl FnOnce(&mut dyn std::io::Write) -> Result<u64>,
) -> Result<u64> {
    let io = |e| ClientError::Io {
        path: to.display().to_string(),
        source: e,
    };
    let partial = to.with_extension(partial_ext);
    let mut out = std::fs::File::create(&partial).map_err(io)?;
    let written = fill(&mut out)
        .and_then(|n| out.sync_all().map(|_| n).map_err(io))
        .and_then(|n| std::fs::rename(&partial, to).map(|_| n).map_err(io));
    written.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}

pub(super) fn lineage(c: &Client, hash: &str, js: bool) -> Result<()> {
    let v = c.lineage(hash)?;
    print(js, &json!(v), || {
        print_lineage(&v, 0, "", &mut BTreeSet::new())
    });
    Ok(())
}

/// The tree, each subtree once: an artifact met again says "(above)".
fn print_lineage(v: &LineageNode, depth: usize, label: &str, seen: &mut BTreeSet<String>) {
    let pad = format!("{}{label}", "  ".repeat(depth));
    let kind = v.artifact.map_or("(kind not recorded)", |a| a.as_str());
    let what = match &v.job {
        Some(job) => format!(
            "{kind} {}, output `{}` of {} job {:?}",
            short(&v.hash),
            v.name,
            job.kind,
            job.name
        ),
        None => format!("{kind} {:?} {}", v.name, short(&v.hash)),
    };
    if !seen.insert(v.hash.clone()) {
        println!("{pad}{what} (above)");
        return;
    }
    println!("{pad}{what}");
    if let Some(job) = &v.job {
        for (name, child) in &job.inputs {
            print_lineage(child, depth + 1, &format!("{name} <- "), seen);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unique_prefixes_tell_ids_apart() {
        let all = vec![
            "01a2379b-eb21-7aaa-8000-000000000001".to_string(),
            "01a2379b-eb21-7aab-8000-000000000002".to_string(),
            "ffff0000-0000-7000-8000-000000000003".to_string(),
        ];
        assert_eq!(super::unique_prefix(&all[0], &all), "01a2379b-eb21-7aaa");
        assert_eq!(super::unique_prefix(&all[1], &all), "01a2379b-eb21-7aab");
        assert_eq!(super::unique_prefix(&all[2], &all), "ffff0000");
    }
}
