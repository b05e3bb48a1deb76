//! Blobs, datasets and checkpoints: uploads stream into the blob store,
//! downloads are verified before they are served, imports are validated
//! and recorded as artifacts.

use super::*;
use herd_core::wire::{DatasetQuery, ListedArtifact, MadeBy, NewCheckpoint, VerifierQuery};

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
        warp::path!("blobs")
            .and(warp::post())
            .and(c.clone())
            .and(upload())
            .and_then(put_blob)
            .boxed(),
        warp::path!("blobs" / String)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_blob)
            .boxed(),
        warp::path!("trees" / String)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_tree)
            .boxed(),
        warp::path!("datasets")
            .and(warp::post())
            .and(c.clone())
            .and(query())
            .and(upload())
            .and_then(import_dataset)
            .boxed(),
        warp::path!("verifiers")
            .and(warp::post())
            .and(c.clone())
            .and(query())
            .and(upload())
            .and_then(import_verifier)
            .boxed(),
        warp::path!("checkpoints")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(import_checkpoint)
            .boxed(),
        warp::path!("artifacts")
            .and(warp::get())
            .and(c.clone())
            .and(query())
            .and_then(list_artifacts)
            .boxed(),
        warp::path!("artifacts" / String)
            .and(warp::get())
            .and(c.clone())
            .and(query())
            .and_then(get_artifact)
            .boxed(),
    ]
}

fn upload() -> impl Filter<
    Extract = (
        super::bodies::BodyPermit,
        impl Stream<Item = Result<impl bytes::Buf, warp::Error>> + Send + 'static,
    ),
    Error = Rejection,
> + Clone {
    warp::body::content_length_limit(UPLOAD_LIMIT)
        .and(super::bodies::permit())
        .and(warp::body::stream())
}

/// Stream a request body into the blob store without holding it in memory.
async fn stream_to_blob<S, B>(ctx: &Ctx, body: S) -> Result<herd_store::BlobInfo, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(8);
    let blobs = ctx.state.store.blobs.clone();
    let writer = tokio::task::spawn_blocking(move || {
        blobs.put_reader(ChannelReader {
            rx,
            cur: Bytes::new(),
        })
    });
    let mut body = Box::pin(body);
    let mut clock = super::bodies::Clock::default();
    loop {
        let chunk = match clock.next(&mut body).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(stalled) => {
                // Abort the blob being written, then say why.
                let _ = tx.send(Err("the request body stalled".into())).await;
                drop(tx);
                let _ = writer.await;
                return Err(stalled);
            }
        };
        let msg = chunk
            .map(|mut b| b.copy_to_bytes(b.remaining()))
            .map_err(|e| e.to_string());
        let failed = msg.is_err();
        if failed {
            let _ = tx.send(msg).await;
            break;
        }
        if tx.send(msg).await.is_err() {
            // The store gave up (a full disk): read the rest of the body so
            // the client, still sending, gets the answer instead of a reset.
            while body.next().await.is_some() {}
            break;
        }
    }
    drop(tx);
    writer.await.map_err(internal)?.map_err(|e| match &e {
        herd_store::StoreError::Io { source, .. } if source.raw_os_error() == Some(28) => {
            warp::reject::custom(ApiError {
                status: StatusCode::INSUFFICIENT_STORAGE,
                message:
                    "no space left on the disk holding the blob store: the upload was not stored"
                        .into(),
            })
        }
        // Errors without an OS code come from the request body itself.
        herd_store::StoreError::Io { source, .. } if source.raw_os_error().is_none() => bad(
            format!("upload failed: the request body broke off ({source})"),
        ),
        _ => internal(e),
    })
}

struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

async fn put_blob<S, B>(ctx: Ctx, _permit: super::bodies::BodyPermit, body: S) -> Res
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    let info = stream_to_blob(&ctx, body).await?;
    created(json!(BlobStored {
        id: info.id,
        size: info.size,
        existed: info.existed,
        repaired: info.repaired,
    }))
}

async fn get_blob(hash: String, ctx: Ctx) -> Res {
    herd_store::blob::validate_id(&hash).map_err(|e| bad(e.to_string()))?;
    if !ctx.state.store.blobs.contains(&hash) {
        return Err(not_found(format!("no blob {hash}")));
    }
    // Verify before answering: a corrupt blob is an error, never a 200 with
    // bad bytes (the stream re-checks as it goes).
    let blobs = ctx.state.store.blobs.clone();
    let h = hash.clone();
    tokio::task::spawn_blocking(move || blobs.verify(&h))
        .await
        .map_err(internal)?
        .map_err(|e| {
            warp::reject::custom(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("{e}; re-upload the right bytes to repair it"),
            })
        })?;
    let reader = ctx.state.store.blobs.reader(&hash).map_err(internal)?;
    warp::http::Response::builder()
        .header("content-type", "application/octet-stream")
        .body(stream_reader(reader))
        .map_err(internal)
}

async fn get_tree(hash: String, ctx: Ctx) -> Res {
    herd_store::blob::validate_id(&hash).map_err(|e| bad(e.to_string()))?;
    let blobs = ctx.state.store.blobs.clone();
    let tree = tokio::task::spawn_blocking(move || blobs.tree(&hash))
        .await
        .map_err(internal)?
        .map_err(|e| not_found(e.to_string()))?;
    reply_json(&TreeListing {
        herd_tree: tree.herd_tree,
        files: tree
            .files
            .into_iter()
            .map(|f| TreeFile {
                name: f.name,
                blob: f.blob.to_string(),
                size: f.size,
            })
            .collect(),
    })
}

/// The largest verifier program recorded: a script, not a model.
const VERIFIER_LIMIT: u64 = 16 << 20;

/// A verifier program, recorded by content: the `grpo` job that names it
/// runs exactly these bytes (see `verifiers::Program`).
async fn import_verifier<S, B>(
    ctx: Ctx,
    q: VerifierQuery,
    _permit: super::bodies::BodyPermit,
    body: S,
) -> Res
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    herd_core::vocab::check_name(&q.name).map_err(|e| bad(format!("query `name`: {e}")))?;
    let info = stream_to_blob(&ctx, body).await?;
    if info.size > VERIFIER_LIMIT || info.size == 0 {
        return Err(bad(format!(
            "a verifier program is 1 to {VERIFIER_LIMIT} bytes, not {}",
            info.size
        )));
    }
    let blobs = ctx.state.store.blobs.clone();
    let hash = info.id.clone();
    let head = tokio::task::spawn_blocking(move || blobs.read(&hash))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    // How it runs: its `#!` line, when it has one.
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let interpreter = first
        .strip_prefix(b"#!")
        .map(|i| String::from_utf8_lossy(i).trim().to_string());
    let summary = json!({"bytes": info.size, "interpreter": interpreter});
    record_import(&ctx, info.id, ArtifactKind::Verifier, q.name, summary).await
}

/// Record an imported artifact and answer with its hash and summary: the
/// last step of every import.
async fn record_import(
    ctx: &Ctx,
    hash: String,
    artifact: ArtifactKind,
    name: String,
    summary: Value,
) -> Res {
    let event = HerdEvent::ArtifactImported {
        hash: hash.clone(),
        artifact,
        name,
        summary: summary.clone(),
    };
    ctx.state
        .record_one(streams::ARTIFACTS, event)
        .await
        .map_err(internal)?;
    created(json!(Imported { hash, summary }))
}

async fn import_dataset<S, B>(
    ctx: Ctx,
    q: DatasetQuery,
    _permit: super::bodies::BodyPermit,
    body: S,
) -> Res
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    let kind = DatasetKind::parse(&q.kind).map_err(bad)?;
    herd_core::vocab::check_name(&q.name).map_err(|e| bad(format!("query `name`: {e}")))?;
    let info = stream_to_blob(&ctx, body).await?;
    if info.size > DATASET_LIMIT {
        return Err(bad(format!(
            "dataset of {} bytes exceeds the {DATASET_LIMIT}-byte limit",
            info.size
        )));
    }
    let blobs = ctx.state.store.blobs.clone();
    let (hash, name) = (info.id.clone(), q.name.clone());
    let parsed = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let bytes = blobs.read(&hash).map_err(|e| e.to_string())?;
        let (ds, notes) =
            data::parse_bytes_noting(kind, &bytes, &name).map_err(|e| e.to_string())?;
        let mut summary = ds.summary();
        if !notes.is_empty() {
            summary["notes"] = serde_json::json!(notes);
        }
        Ok(summary)
    })
    .await
    .map_err(internal)?;
    // Nothing is recorded unless the whole file parsed.
    let summary = parsed.map_err(bad)?;
    record_import(&ctx, info.id, kind.artifact(), q.name, summary).await
}

async fn import_checkpoint(ctx: Ctx, body: NewCheckpoint) -> Res {
    herd_core::vocab::check_name(&body.name).map_err(|e| bad(format!("field `name`: {e}")))?;
    let mut entries = vec![];
    for (name, hash) in &body.files {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(bad(format!("field `files`: bad file name {name:?}")));
        }
        herd_store::blob::validate_id(hash)
            .map_err(|e| bad(format!("field `files.{name}`: {e}")))?;
        let path = ctx.state.store.blobs.path_of(hash).map_err(internal)?;
        let size = std::fs::metadata(&path)
            .map_err(|_| {
                bad(format!(
                    "field `files.{name}`: blob {hash} was not uploaded"
                ))
            })?
            .len();
        entries.push(herd_store::TreeEntry {
            name: name.clone(),
            blob: hash.clone(),
            size,
        });
    }
    let is_adapter = body.files.contains_key(herd_engine::lora::ADAPTER_CONFIG);
    let mut body = body;
    if is_adapter && body.base.is_none() {
        // An adapter herd wrote names its base by hash: take it when it is
        // a recorded checkpoint.
        body.base = named_base(&ctx, &body.files[herd_engine::lora::ADAPTER_CONFIG]).await;
    }
    // An adapter is checked against its base's config (shapes only).
    let base_config = match (&body.base, is_adapter) {
        (None, true) => {
            return Err(bad(
                "field `files`: a PEFT adapter (adapter_config.json): give the checkpoint it adapts (`herd import model DIR --base HASH`)".to_string(),
            ))
        }
        (Some(_), false) => {
            return Err(bad(
                "field `base`: only a PEFT adapter (a directory with adapter_config.json) has a base".to_string(),
            ))
        }
        (Some(base), true) => {
            let p = ctx.state.projection.read().await;
            match p.artifacts.get(base) {
                Some(a) if a.artifact == ArtifactKind::Checkpoint => {}
                Some(a) => {
                    return Err(bad(format!(
                        "field `base`: {base} is a {}, not a checkpoint",
                        a.artifact
                    )))
                }
                None => {
                    return Err(bad(format!(
                        "field `base`: no recorded checkpoint {base} (import the base model first)"
                    )))
                }
            }
            let tree = ctx.state.store.blobs.tree(base).map_err(internal)?;
            let config = tree
                .files
                .iter()
                .find(|e| e.name == herd_engine::checkpoint::CONFIG)
                .ok_or_else(|| bad(format!("field `base`: checkpoint {base} has no config.json")))?;
            Some(ctx.state.store.blobs.path_of(&config.blob).map_err(internal)?)
        }
        (None, false) => None,
    };
    let needs: &[&str] = if is_adapter {
        &[herd_engine::lora::ADAPTER_WEIGHTS]
    } else {
        &["config.json", "tokenizer.json"]
    };
    for need in needs {
        if !body.files.contains_key(*need) {
            return Err(bad(format!(
                "field `files`: {} needs {need}",
                if is_adapter {
                    "an adapter"
                } else {
                    "a checkpoint"
                }
            )));
        }
    }
    let state = ctx.state.clone();
    let (hash, summary) =
        tokio::task::spawn_blocking(move || -> Result<(String, Value), String> {
            let files = entries.clone();
            let tree = state
                .store
                .blobs
                .put_tree(entries)
                .map_err(|e| e.to_string())?;
            // The directory as links to the blobs: nothing is copied, and
            // only the config, the tokenizer and the weight headers are read.
            let dir = state.data_dir.join("tmp").join(Uuid::now_v7().to_string());
            let linked = std::fs::create_dir_all(&dir).and_then(|()| {
                for f in &files {
                    let blob = state
                        .store
                        .blobs
                        .path_of(&f.blob)
                        .map_err(std::io::Error::other)?;
                    std::os::unix::fs::symlink(blob, dir.join(&f.name))?;
                }
                Ok(())
            });
            // Refuse what the engine cannot load, with the engine's reason.
            // Errors name the files as the user knows them (no temp path).
            let ours = format!("{}/", dir.display());
            let check = linked.map_err(|e| e.to_string()).and_then(|()| {
                match &base_config {
                    Some(config) => herd_engine::checkpoint::inspect_adapter(&dir, config),
                    None => herd_engine::checkpoint::inspect(&dir),
                }
                .map_err(|e| {
                    e.to_string()
                        .replace(&ours, "")
                        .replace(&format!("{}: ", dir.display()), "")
                        .replace(&dir.display().to_string(), "the model directory")
                })
            });
            let _ = std::fs::remove_dir_all(&dir);
            Ok((tree.id, check?))
        })
        .await
        .map_err(internal)?
        .map_err(|e| {
            bad(if is_adapter {
                format!("not a LoRA adapter of that base: {e}")
            } else {
                format!("not a loadable Llama checkpoint: {e}")
            })
        })?;
    let (artifact, summary) = match &body.base {
        Some(base) => {
            let mut summary = summary;
            summary["base"] = base.clone().into();
            (ArtifactKind::Adapter, summary)
        }
        None => {
            // The name the ecosystem knows it by, for exports (PEFT's
            // `base_model_name_or_path`, a model card's `base_model`): the
            // config's `_name_or_path` when it has one, else the import's
            // name (the directory's, by default).
            let mut summary = summary;
            let config_blob = &body.files[herd_engine::checkpoint::CONFIG];
            let named = source_name(&ctx, config_blob).await;
            summary["source_name"] = named.unwrap_or_else(|| body.name.clone()).into();
            (ArtifactKind::Checkpoint, summary)
        }
    };
    record_import(&ctx, hash, artifact, body.name, summary).await
}

/// A config's `_name_or_path`, when it is a name (not empty).
async fn source_name(ctx: &Ctx, config_blob: &str) -> Option<String> {
    let config = read_json_blob(ctx, config_blob).await?;
    let named = config["_name_or_path"].as_str()?.trim();
    (!named.is_empty()).then(|| named.to_string())
}

async fn read_json_blob(ctx: &Ctx, blob: &str) -> Option<Value> {
    let path = ctx.state.store.blobs.path_of(blob).ok()?;
    let text = tokio::fs::read_to_string(path).await.ok()?;
    serde_json::from_str(&text).ok()
}

/// The recorded checkpoint an adapter's config names as its base: herd's
/// own field (`herd_base_model`, which `herd export` writes beside the
/// base's public name), else `base_model_name_or_path` (which the jobs set
/// to the base's hash), if either is a recorded checkpoint.
async fn named_base(ctx: &Ctx, config_blob: &str) -> Option<String> {
    let config = read_json_blob(ctx, config_blob).await?;
    let p = ctx.state.projection.read().await;
    ["herd_base_model", "base_model_name_or_path"]
        .iter()
        .filter_map(|k| config[*k].as_str())
        .find_map(|named| {
            p.artifacts
                .get(named)
                .filter(|a| a.artifact == ArtifactKind::Checkpoint)
                .map(|a| a.hash.clone())
        })
}

/// Recorded artifacts; each job output names its maker as people address
/// it (`my-exp/0/sft.checkpoint`), since the output's own name is only
/// `checkpoint`.
async fn list_artifacts(ctx: Ctx, q: ArtifactQuery) -> Res {
    let p = ctx.state.projection.read().await;
    let mut list = vec![];
    for a in p.artifacts.values() {
        if q.kind.is_some_and(|k| a.artifact != k)
            || q.produced
                .is_some_and(|by_job| a.produced_by.is_some() != by_job)
        {
            continue;
        }
        // From the maker's row, always in memory (its full view may not be).
        let made_by = a
            .produced_by
            .and_then(|id| Some((id, p.rows.get(&id)?)))
            .map(|(id, j)| {
                let experiment = j
                    .experiment
                    .and_then(|e| p.experiments.get(&e))
                    .map(|e| e.name.as_str());
                let round = j.round.and_then(|r| p.rounds.get(&r)).map(|r| r.index);
                MadeBy::new((id, j.kind, &j.name), experiment, round, &a.name)
            });
        list.push(ListedArtifact {
            artifact: a.clone(),
            made_by,
        });
    }
    reply_json(&list)
}

/// The most rows of a dataset one `GET /artifacts/{hash}` shows.
const MAX_ROWS_SHOWN: usize = 100;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ArtifactRows {
    rows: Option<usize>,
    /// Rows to skip first: a page further in (a grpo job's rollouts of one
    /// step).
    offset: Option<usize>,
}

/// An artifact; a dataset's first rows come from its verified blob.
async fn get_artifact(hash: String, ctx: Ctx, q: ArtifactRows) -> Res {
    let artifact = recorded_artifact(&ctx, &hash).await?;
    let wanted = q.rows.unwrap_or(3);
    if wanted > MAX_ROWS_SHOWN {
        return Err(bad(format!(
            "query `rows`: at most {MAX_ROWS_SHOWN} rows are shown, not {wanted}; export the dataset for all of them"
        )));
    }
    let mut rows = vec![];
    // Rows of the artifacts that are JSON Lines (a verifier is a program).
    let lines = !artifact.artifact.is_directory() && artifact.artifact != ArtifactKind::Verifier;
    if lines && wanted > 0 {
        let blobs = ctx.state.store.blobs.clone();
        let h = hash.clone();
        let bytes = tokio::task::spawn_blocking(move || blobs.read(&h))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let skip = q.offset.unwrap_or(0);
        for (i, line) in bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .enumerate()
            .skip(skip)
            .take(wanted)
        {
            rows.push(
                serde_json::from_slice(line).map_err(|e| {
                    internal(anyhow::anyhow!("dataset {hash}, line {}: {e}", i + 1))
                })?,
            );
        }
    }
    reply_json(&ArtifactDetail { artifact, rows })
}

/// A recorded artifact by its hash, or 404 saying where to find them.
pub(super) async fn recorded_artifact(
    ctx: &Ctx,
    hash: &str,
) -> Result<herd_core::model::ArtifactView, Rejection> {
    ctx.state
        .projection
        .read()
        .await
        .artifacts
        .get(hash)
        .cloned()
        .ok_or_else(|| {
            not_found(format!(
                "no recorded artifact {hash}; `herd artifacts` lists them"
            ))
        })
}
