//! The HTTP API (warp). JSON in and out; every error is a 4xx/5xx with
//! `{"error": "..."}` saying what is wrong. Request bodies are size-limited;
//! uploads stream into the blob store. Every route but `/health` needs the
//! bearer token. See API.md.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herd_store::model::{streams, HerdEvent, JobStatus, JobView, MetricPoint};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::data::{self, DatasetKind};
use crate::jobs::{self, JobKind};
use crate::references::{self, InputRef};
use crate::rounds::{self, RoundSpec};
use crate::scheduler::{Scheduler, EXTERNAL};
use crate::state::State;

/// JSON bodies larger than this are refused (uploads are streamed instead).
pub const JSON_LIMIT: u64 = 8 * 1024 * 1024;
/// Largest upload accepted as one blob.
pub const UPLOAD_LIMIT: u64 = 64 * 1024 * 1024 * 1024;
/// Largest dataset parsed at import.
pub const DATASET_LIMIT: u64 = 1024 * 1024 * 1024;
/// Deepest nesting of arrays and objects in a request body. Far above any
/// real request, far below what the store and every reader can hold.
pub const MAX_JSON_DEPTH: usize = 32;
/// Most metric points in one request.
pub const MAX_POINTS: usize = 100_000;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl warp::reject::Reject for ApiError {}

fn bad(msg: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError {
        status: StatusCode::BAD_REQUEST,
        message: msg.into(),
    })
}
fn not_found(msg: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError {
        status: StatusCode::NOT_FOUND,
        message: msg.into(),
    })
}
fn conflict(msg: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError {
        status: StatusCode::CONFLICT,
        message: msg.into(),
    })
}
fn internal(e: impl std::fmt::Display) -> Rejection {
    let message = e.to_string();
    // The store refusing an append (too large, bad stream) is the caller's doing.
    let status = if message.starts_with("invalid append") {
        StatusCode::BAD_REQUEST
    } else if message.starts_with("no space left") {
        StatusCode::INSUFFICIENT_STORAGE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    warp::reject::custom(ApiError { status, message })
}

#[derive(Clone)]
pub struct Ctx {
    pub state: Arc<State>,
    pub scheduler: Arc<Scheduler>,
    pub token: Arc<String>,
}

fn with<T: Clone + Send>(x: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || x.clone())
}

fn json_body<T: serde::de::DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(JSON_LIMIT)
        .and(warp::body::bytes().or_else(|_| async {
            // Without this, a body shorter than its Content-Length came out
            // as warp's generic 405 from the routes tried after this one.
            Err(bad("the request body ended before its Content-Length"))
        }))
        .and_then(|b: Bytes| async move {
            let depth = herd_store::event::json_depth(&b);
            if depth > MAX_JSON_DEPTH {
                return Err(bad(format!(
                    "invalid JSON body: nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}"
                )));
            }
            serde_json::from_slice::<T>(&b).map_err(|e| bad(format!("invalid JSON body: {e}")))
        })
}

fn auth(token: Arc<String>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |h: Option<String>| {
            let token = token.clone();
            async move {
                let given = h
                    .as_deref()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                // Constant-time comparison.
                let ok = given.len() == token.len()
                    && given
                        .bytes()
                        .zip(token.bytes())
                        .fold(0u8, |a, (x, y)| a | (x ^ y))
                        == 0;
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(ApiError {
                        status: StatusCode::UNAUTHORIZED,
                        message: "missing or wrong bearer token".into(),
                    }))
                }
            }
        })
        .untuple_one()
}

pub fn routes(ctx: Ctx) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    type Route = warp::filters::BoxedFilter<(warp::reply::Response,)>;
    let health = warp::path!("health").and(warp::get()).map(|| {
        warp::reply::json(&json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
            .into_response()
    });
    let c = with(ctx.clone());
    let routes: Vec<Route> = vec![
        warp::path!("experiments")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(create_experiment)
            .boxed(),
        warp::path!("experiments")
            .and(warp::get())
            .and(c.clone())
            .and_then(list_experiments)
            .boxed(),
        warp::path!("experiments" / Uuid)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_experiment)
            .boxed(),
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
            .and(warp::query())
            .and(upload())
            .and_then(import_dataset)
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
            .and_then(list_artifacts)
            .boxed(),
        warp::path!("jobs")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(submit_job)
            .boxed(),
        warp::path!("jobs")
            .and(warp::get())
            .and(c.clone())
            .and(warp::query())
            .and_then(list_jobs)
            .boxed(),
        warp::path!("jobs" / Uuid)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_job)
            .boxed(),
        warp::path!("jobs" / Uuid / "metrics")
            .and(warp::get())
            .and(c.clone())
            .and(warp::query())
            .and_then(get_metrics)
            .boxed(),
        warp::path!("jobs" / Uuid / "cancel")
            .and(warp::post())
            .and(c.clone())
            .and_then(cancel_job)
            .boxed(),
        warp::path!("jobs" / Uuid / "reproduce")
            .and(warp::post())
            .and(c.clone())
            .and_then(reproduce_job)
            .boxed(),
        warp::path!("rounds")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(submit_round)
            .boxed(),
        warp::path!("rounds" / Uuid)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_round)
            .boxed(),
        warp::path!("rounds" / Uuid / "reproduce")
            .and(warp::post())
            .and(c.clone())
            .and_then(reproduce_round)
            .boxed(),
        warp::path!("runs")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(open_run)
            .boxed(),
        warp::path!("runs" / Uuid / "metrics")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(log_metrics)
            .boxed(),
        warp::path!("runs" / Uuid / "artifacts")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(log_artifact)
            .boxed(),
        warp::path!("runs" / Uuid / "close")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(close_run)
            .boxed(),
        warp::path!("lineage" / String)
            .and(warp::get())
            .and(c.clone())
            .and_then(lineage)
            .boxed(),
        warp::path!("events")
            .and(warp::get())
            .and(c.clone())
            .and(warp::query())
            .and_then(events)
            .boxed(),
        warp::path!("verify")
            .and(warp::post())
            .and(c.clone())
            .and_then(verify)
            .boxed(),
        warp::path!("status")
            .and(warp::get())
            .and(c.clone())
            .and_then(status)
            .boxed(),
    ];
    // Boxed and folded one by one: warp's nested types otherwise overflow the compiler.
    let api = routes
        .into_iter()
        .reduce(|a, b| a.or(b).unify().boxed())
        .expect("routes");
    let state = ctx.state.clone();
    health
        .or(auth(ctx.token.clone()).and(api))
        .unify()
        .recover(move |err| recover(err, state.clone()))
}

/// Every rejection as `{"error": ...}`. Server paths become `DATA/...`:
/// a client has no business knowing where the data directory lives.
async fn recover(err: Rejection, state: Arc<State>) -> Result<impl Reply, Infallible> {
    let (status, message) = if let Some(e) = err.find::<ApiError>() {
        (e.status, e.message.clone())
    } else if err.is_not_found() {
        (StatusCode::NOT_FOUND, "no such route".into())
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, format!("request body too large (limit {JSON_LIMIT} bytes for JSON; upload big files to /blobs)"))
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "a Content-Length header is required".into(),
        )
    } else if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        (
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {e}"),
        )
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
    } else if let Some(e) = err.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else {
        (StatusCode::BAD_REQUEST, format!("{err:?}"))
    };
    let message = state.without_server_paths(&message);
    Ok(warp::reply::with_status(
        warp::reply::json(&json!({"error": message})),
        status,
    ))
}

type Res = Result<warp::reply::Response, Rejection>;

fn ok(v: Value) -> Res {
    Ok(warp::reply::json(&v).into_response())
}

fn created(v: Value) -> Res {
    Ok(warp::reply::with_status(warp::reply::json(&v), StatusCode::CREATED).into_response())
}

// ---------- experiments

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewExperiment {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_experiment(ctx: Ctx, body: NewExperiment) -> Res {
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(bad("field `name`: 1 to 200 characters"));
    }
    let id = Uuid::now_v7();
    let event = HerdEvent::ExperimentCreated {
        experiment: id,
        name: body.name,
        description: body.description,
    };
    ctx.state
        .record_one(&streams::experiment(id), event)
        .await
        .map_err(internal)?;
    created(json!({"id": id}))
}

async fn list_experiments(ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    ok(json!(p.experiments.values().collect::<Vec<_>>()))
}

async fn get_experiment(id: Uuid, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let e = p
        .experiments
        .get(&id)
        .ok_or_else(|| not_found(format!("no experiment {id}")))?;
    let rounds: Vec<_> = e.rounds.iter().filter_map(|r| p.rounds.get(r)).collect();
    ok(json!({"experiment": e, "rounds": rounds}))
}

// ---------- blobs, datasets, checkpoints

fn upload() -> impl Filter<
    Extract = (impl Stream<Item = Result<impl bytes::Buf, warp::Error>> + Send + 'static,),
    Error = Rejection,
> + Clone {
    warp::body::content_length_limit(UPLOAD_LIMIT).and(warp::body::stream())
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
    while let Some(chunk) = body.next().await {
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
                message: "no space left on the disk holding the blob store: the upload was not stored".into(),
            })
        }
        // Errors without an OS code come from the request body itself.
        herd_store::StoreError::Io { source, .. } if source.raw_os_error().is_none() => {
            bad(format!("upload failed: the request body broke off ({source})"))
        }
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

async fn put_blob<S, B>(ctx: Ctx, body: S) -> Res
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    let info = stream_to_blob(&ctx, body).await?;
    created(json!(info))
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
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Ok(warp::http::Response::builder()
        .header("content-type", "application/octet-stream")
        .body(warp::hyper::Body::wrap_stream(stream))
        .map_err(internal)?)
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

async fn get_tree(hash: String, ctx: Ctx) -> Res {
    herd_store::blob::validate_id(&hash).map_err(|e| bad(e.to_string()))?;
    let blobs = ctx.state.store.blobs.clone();
    let tree = tokio::task::spawn_blocking(move || blobs.tree(&hash))
        .await
        .map_err(internal)?
        .map_err(|e| not_found(e.to_string()))?;
    ok(json!(tree))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetQuery {
    kind: String,
    name: String,
}

async fn import_dataset<S, B>(ctx: Ctx, q: DatasetQuery, body: S) -> Res
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    let kind = DatasetKind::parse(&q.kind).map_err(bad)?;
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
        let ds = data::parse_bytes(kind, &bytes, &name).map_err(|e| e.to_string())?;
        Ok(ds.summary())
    })
    .await
    .map_err(internal)?;
    // Nothing is recorded unless the whole file parsed.
    let summary = parsed.map_err(bad)?;
    let event = HerdEvent::ArtifactImported {
        hash: info.id.clone(),
        artifact: kind.as_str().into(),
        name: q.name,
        summary: summary.clone(),
    };
    ctx.state
        .record_one(streams::ARTIFACTS, event)
        .await
        .map_err(internal)?;
    created(json!({"hash": info.id, "summary": summary}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCheckpoint {
    name: String,
    /// file name -> blob hash (upload each file to /blobs first)
    files: BTreeMap<String, String>,
}

async fn import_checkpoint(ctx: Ctx, body: NewCheckpoint) -> Res {
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
    for need in ["config.json", "tokenizer.json"] {
        if !body.files.contains_key(need) {
            return Err(bad(format!("field `files`: a checkpoint needs {need}")));
        }
    }
    let state = ctx.state.clone();
    let (hash, summary) =
        tokio::task::spawn_blocking(move || -> Result<(String, Value), String> {
            let tree = state
                .store
                .blobs
                .put_tree(entries)
                .map_err(|e| e.to_string())?;
            let dir = state.data_dir.join("tmp").join(Uuid::now_v7().to_string());
            state
                .store
                .blobs
                .materialize(&tree.id, &dir)
                .map_err(|e| e.to_string())?;
            // Refuse what the engine cannot load, with the engine's reason.
            let check = herd_engine::checkpoint::describe(&dir).and_then(|d| {
                herd_engine::checkpoint::load_chat(&dir)?;
                let cfg = herd_engine::LlamaConfig::from_file(&dir.join("config.json"))?;
                let tensors = herd_engine::checkpoint::load_tensors(&dir)?;
                herd_engine::Llama::from_tensors(cfg, tensors, &candle_core::Device::Cpu)?;
                Ok(d)
            });
            let _ = std::fs::remove_dir_all(&dir);
            Ok((tree.id, check.map_err(|e| e.to_string())?))
        })
        .await
        .map_err(internal)?
        .map_err(|e| bad(format!("not a loadable Llama checkpoint: {e}")))?;
    let event = HerdEvent::ArtifactImported {
        hash: hash.clone(),
        artifact: "checkpoint".into(),
        name: body.name,
        summary: summary.clone(),
    };
    ctx.state
        .record_one(streams::ARTIFACTS, event)
        .await
        .map_err(internal)?;
    created(json!({"hash": hash, "summary": summary}))
}

async fn list_artifacts(ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    ok(json!(p.artifacts.values().collect::<Vec<_>>()))
}

// ---------- jobs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewJob {
    kind: String,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    hyperparameters: Value,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    experiment: Option<Uuid>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    depends_on: Vec<Uuid>,
}

async fn submit_job(ctx: Ctx, body: NewJob) -> Res {
    let kind = JobKind::parse(&body.kind).map_err(|e| bad(format!("field `kind`: {e}")))?;
    let hp = jobs::effective_hyperparameters(kind, &body.hyperparameters)
        .map_err(|e| bad(format!("field `hyperparameters`: {e}")))?;
    let mut depends_on = body.depends_on.clone();
    {
        let p = ctx.state.projection.read().await;
        if let Some(e) = body.experiment {
            if !p.experiments.contains_key(&e) {
                return Err(bad(format!("field `experiment`: no experiment {e}")));
            }
        }
        references::check_inputs(&p, &BTreeMap::new(), kind, &body.inputs)
            .map_err(|e| bad(format!("field `inputs`: {e}")))?;
        for (name, v) in &body.inputs {
            match InputRef::parse(v).map_err(|e| bad(format!("field `inputs.{name}`: {e}")))? {
                InputRef::JobOutput { job, .. } => {
                    if !depends_on.contains(&job) {
                        depends_on.push(job);
                    }
                }
                InputRef::Blob(hash) if !ctx.state.store.blobs.contains(&hash) => {
                    return Err(bad(format!(
                        "field `inputs.{name}`: blob {hash} is recorded but missing from the blob store (run `herd verify`)"
                    )));
                }
                InputRef::Blob(_) => {}
            }
        }
        for d in &depends_on {
            if !p.jobs.contains_key(d) {
                return Err(bad(format!("field `depends_on`: no job {d}")));
            }
        }
    }
    let id = Uuid::now_v7();
    let event = HerdEvent::JobSubmitted {
        job: id,
        experiment: body.experiment,
        round: None,
        name: body.name.unwrap_or_else(|| kind.as_str().to_string()),
        kind: kind.as_str().into(),
        inputs: body.inputs,
        hyperparameters: hp.clone(),
        seed: body.seed,
        depends_on,
        priority: body.priority,
        reproduces: None,
    };
    ctx.state
        .record_one(&streams::job(id), event)
        .await
        .map_err(internal)?;
    created(json!({"id": id, "effective_hyperparameters": hp}))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    experiment: Option<Uuid>,
    kind: Option<String>,
    status: Option<String>,
    round: Option<Uuid>,
    /// Comma-separated conditions: `lr<1e-4`, `metric.loss<=2`, `hp.beta=0.1`.
    #[serde(rename = "where")]
    where_: Option<String>,
    /// A field to sort by (`submitted`, `hp.X`, `metric.X`), `-` for descending.
    sort: Option<String>,
    limit: Option<usize>,
}

fn job_value(j: &JobView, key: &str) -> Option<f64> {
    let (scope, name) = key.split_once('.').unwrap_or(("", key));
    let hp = || {
        j.effective_hyperparameters
            .get(name)
            .or_else(|| j.hyperparameters.get(name))
            .and_then(|v| v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64)))
    };
    let metric = || j.last_metrics.get(name).map(|x| x.1);
    match scope {
        "hp" => hp(),
        "metric" => metric(),
        _ => match name {
            "submitted" => Some(j.submitted_seq as f64),
            "seed" => Some(j.seed as f64),
            _ => hp().or_else(metric),
        },
    }
}

type Condition = (String, String, f64);

fn parse_where(s: &str) -> Result<Vec<Condition>, String> {
    s.split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            let c = c.trim();
            for op in ["<=", ">=", "!=", "<", ">", "="] {
                if let Some((k, v)) = c.split_once(op) {
                    let v: f64 = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("where: {c:?}: {v:?} is not a number"))?;
                    return Ok((k.trim().to_string(), op.to_string(), v));
                }
            }
            Err(format!(
                "where: {c:?} has no operator (<, <=, >, >=, =, !=)"
            ))
        })
        .collect()
}

fn holds(j: &JobView, (k, op, v): &Condition) -> bool {
    let Some(x) = job_value(j, k) else {
        return false;
    };
    match op.as_str() {
        "<" => x < *v,
        "<=" => x <= *v,
        ">" => x > *v,
        ">=" => x >= *v,
        "=" => x == *v,
        _ => x != *v,
    }
}

fn job_json(ctx: &Ctx, j: &JobView) -> Value {
    let mut v = json!(j);
    if let Some(p) = ctx.state.progress.lock().expect("progress lock").get(&j.id) {
        v["progress"] = json!(p);
    }
    v
}

async fn list_jobs(ctx: Ctx, q: JobQuery) -> Res {
    let conds = parse_where(q.where_.as_deref().unwrap_or("")).map_err(bad)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                bad(format!(
                    "status {s:?} is not queued|running|succeeded|failed|cancelled"
                ))
            })
        })
        .transpose()?;
    let p = ctx.state.projection.read().await;
    let mut out: Vec<&JobView> = p
        .jobs
        .values()
        .filter(|j| q.experiment.is_none() || j.experiment == q.experiment)
        .filter(|j| q.kind.as_deref().is_none_or(|k| j.kind == k))
        .filter(|j| status.is_none_or(|s| j.status == s))
        .filter(|j| q.round.is_none() || j.round == q.round)
        .filter(|j| conds.iter().all(|c| holds(j, c)))
        .collect();
    if let Some(sort) = &q.sort {
        let (desc, key) = sort
            .strip_prefix('-')
            .map(|k| (true, k))
            .unwrap_or((false, sort.as_str()));
        out.sort_by(|a, b| {
            let (x, y) = (
                job_value(a, key).unwrap_or(f64::NAN),
                job_value(b, key).unwrap_or(f64::NAN),
            );
            let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
            if desc {
                o.reverse()
            } else {
                o
            }
        });
    }
    let out: Vec<Value> = out
        .into_iter()
        .take(q.limit.unwrap_or(usize::MAX))
        .map(|j| job_json(&ctx, j))
        .collect();
    ok(json!(out))
}

async fn get_job(id: Uuid, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let j = p
        .jobs
        .get(&id)
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    ok(job_json(&ctx, j))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    /// Comma-separated metric names; all when absent.
    names: Option<String>,
    /// Which attempt's points (1-based); the latest when absent.
    attempt: Option<u32>,
}

/// A job's metric series: the latest attempt's (the live view), or an
/// earlier attempt's, folded from the job's stream in the log.
async fn get_metrics(id: Uuid, ctx: Ctx, q: MetricsQuery) -> Res {
    let p = ctx.state.projection.read().await;
    let job = p.jobs.get(&id).ok_or_else(|| not_found(format!("no job {id}")))?;
    let latest = job.attempts;
    let wanted: Option<Vec<&str>> = q.names.as_deref().map(|n| n.split(',').collect());
    let keep = |k: &str| wanted.as_ref().is_none_or(|w| w.contains(&k));
    let attempt = q.attempt.unwrap_or(latest);
    if attempt == latest || latest == 0 {
        let empty = BTreeMap::new();
        let series = p.series.get(&id).unwrap_or(&empty);
        let out: serde_json::Map<String, Value> = series
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        return ok(json!({"attempt": latest, "attempts": latest, "series": out}));
    }
    if attempt == 0 || attempt > latest {
        return Err(bad(format!(
            "query `attempt`: job {id} has attempts 1..={latest}, not {attempt}"
        )));
    }
    drop(p);
    let log = ctx.state.store.log.clone();
    let events = tokio::task::spawn_blocking(move || log.read_stream(&streams::job(id), 1, usize::MAX))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for rec in &events {
        if let Ok(HerdEvent::JobMetrics { attempt: a, points, .. }) = HerdEvent::from_recorded(rec) {
            if a == attempt {
                for pt in points.into_iter().filter(|pt| keep(&pt.name)) {
                    series.entry(pt.name).or_default().push((pt.step, pt.value));
                }
            }
        }
    }
    ok(json!({"attempt": attempt, "attempts": latest, "series": series}))
}

async fn cancel_job(id: Uuid, ctx: Ctx) -> Res {
    match ctx.scheduler.cancel(id).await {
        Ok(true) => ok(json!({"id": id, "cancelling": true})),
        Ok(false) => Err(conflict(format!("job {id} has already ended"))),
        Err(e) => Err(not_found(e.to_string())),
    }
}

/// Re-run a finished job with exactly its recorded resolved inputs,
/// effective hyperparameters and seed.
async fn reproduce_one(ctx: &Ctx, id: Uuid) -> Result<Uuid, Rejection> {
    let j = ctx
        .state
        .projection
        .read()
        .await
        .jobs
        .get(&id)
        .cloned()
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    if j.kind == EXTERNAL {
        return Err(bad(format!(
            "job {id} is an external run; herd cannot re-run it"
        )));
    }
    if j.resolved_inputs.is_empty() && !j.inputs.is_empty() {
        return Err(conflict(format!(
            "job {id} never started; nothing recorded to reproduce"
        )));
    }
    let new = Uuid::now_v7();
    let event = HerdEvent::JobSubmitted {
        job: new,
        experiment: j.experiment,
        round: None,
        name: format!("{} (reproduce)", j.name),
        kind: j.kind.clone(),
        inputs: j.resolved_inputs.clone(),
        hyperparameters: if j.effective_hyperparameters.is_null() {
            j.hyperparameters.clone()
        } else {
            j.effective_hyperparameters.clone()
        },
        seed: j.seed,
        depends_on: vec![],
        priority: j.priority,
        reproduces: Some(id),
    };
    ctx.state
        .record_one(&streams::job(new), event)
        .await
        .map_err(internal)?;
    Ok(new)
}

async fn reproduce_job(id: Uuid, ctx: Ctx) -> Res {
    let new = reproduce_one(&ctx, id).await?;
    created(json!({"id": new, "reproduces": id}))
}

// ---------- rounds

async fn submit_round(ctx: Ctx, spec: Value) -> Res {
    let spec_parsed: RoundSpec =
        serde_json::from_value(spec.clone()).map_err(|e| bad(format!("round spec: {e}")))?;
    let (index, previous) = {
        let p = ctx.state.projection.read().await;
        let exp = p.experiments.get(&spec_parsed.experiment).ok_or_else(|| {
            bad(format!(
                "field `experiment`: no experiment {}",
                spec_parsed.experiment
            ))
        })?;
        let last = exp
            .rounds
            .iter()
            .filter_map(|r| p.rounds.get(r))
            .max_by_key(|r| r.index);
        let previous = last.and_then(|r| {
            let names: Vec<(Uuid, String)> = r
                .jobs
                .iter()
                .filter_map(|j| p.jobs.get(j).map(|v| (v.id, v.name.clone())))
                .collect();
            rounds::final_policy_ref(&r.spec, &names)
        });
        (last.map(|r| r.index + 1).unwrap_or(0), previous)
    };
    let planned = {
        let p = ctx.state.projection.read().await;
        rounds::expand(&spec_parsed, previous, &p).map_err(|e| bad(format!("round spec: {e}")))?
    };
    let round = Uuid::now_v7();
    let exp = spec_parsed.experiment;
    let jobs: Vec<Uuid> = planned.iter().map(|j| j.id).collect();
    ctx.state
        .record_one(
            &streams::experiment(exp),
            HerdEvent::RoundSubmitted {
                experiment: exp,
                round,
                index,
                spec,
                jobs: jobs.clone(),
            },
        )
        .await
        .map_err(internal)?;
    for j in planned {
        let event = HerdEvent::JobSubmitted {
            job: j.id,
            experiment: Some(exp),
            round: Some(round),
            name: j.name,
            kind: j.kind.as_str().into(),
            inputs: j.inputs,
            hyperparameters: j.hyperparameters,
            seed: j.seed,
            depends_on: j.depends_on,
            priority: j.priority,
            reproduces: None,
        };
        ctx.state
            .record_one(&streams::job(j.id), event)
            .await
            .map_err(internal)?;
    }
    created(json!({"id": round, "index": index, "jobs": jobs}))
}

async fn get_round(id: Uuid, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let r = p
        .rounds
        .get(&id)
        .ok_or_else(|| not_found(format!("no round {id}")))?;
    let jobs: Vec<Value> = r
        .jobs
        .iter()
        .filter_map(|j| p.jobs.get(j))
        .map(|j| job_json(&ctx, j))
        .collect();
    ok(json!({"round": r, "jobs": jobs}))
}

async fn reproduce_round(id: Uuid, ctx: Ctx) -> Res {
    let jobs = ctx
        .state
        .projection
        .read()
        .await
        .rounds
        .get(&id)
        .map(|r| r.jobs.clone())
        .ok_or_else(|| not_found(format!("no round {id}")))?;
    let mut pairs = vec![];
    for j in jobs {
        pairs.push(json!({"original": j, "reproduction": reproduce_one(&ctx, j).await?}));
    }
    created(json!({"round": id, "jobs": pairs}))
}

// ---------- external runs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRun {
    name: String,
    #[serde(default)]
    experiment: Option<Uuid>,
    #[serde(default)]
    hyperparameters: Value,
}

async fn open_run(ctx: Ctx, body: NewRun) -> Res {
    if let Some(e) = body.experiment {
        if !ctx
            .state
            .projection
            .read()
            .await
            .experiments
            .contains_key(&e)
        {
            return Err(bad(format!("field `experiment`: no experiment {e}")));
        }
    }
    let id = Uuid::now_v7();
    let stream = streams::job(id);
    let events = vec![
        HerdEvent::JobSubmitted {
            job: id,
            experiment: body.experiment,
            round: None,
            name: body.name,
            kind: EXTERNAL.into(),
            inputs: BTreeMap::new(),
            hyperparameters: body.hyperparameters.clone(),
            seed: 0,
            depends_on: vec![],
            priority: 0,
            reproduces: None,
        },
        HerdEvent::JobStarted {
            job: id,
            attempt: 1,
            device: "external".into(),
            pid: None,
            engine_version: "external".into(),
            threads: 0,
            resolved_inputs: BTreeMap::new(),
            effective_hyperparameters: body.hyperparameters,
            fingerprint: BTreeMap::new(),
        },
    ];
    ctx.state.record(&stream, events).await.map_err(internal)?;
    created(json!({"id": id}))
}

async fn open_run_view(ctx: &Ctx, id: Uuid) -> Result<(), Rejection> {
    let p = ctx.state.projection.read().await;
    let j = p
        .jobs
        .get(&id)
        .ok_or_else(|| not_found(format!("no run {id}")))?;
    if j.kind != EXTERNAL {
        return Err(bad(format!("job {id} is not an external run")));
    }
    if j.status != JobStatus::Running {
        return Err(conflict(format!("run {id} is closed")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricBatch {
    points: Vec<MetricPoint>,
}

async fn log_metrics(id: Uuid, ctx: Ctx, body: MetricBatch) -> Res {
    if body.points.is_empty() || body.points.len() > MAX_POINTS {
        return Err(bad(format!("field `points`: 1 to {MAX_POINTS} points")));
    }
    if let Some((i, p)) = body
        .points
        .iter()
        .enumerate()
        .find(|(_, p)| !p.value.is_finite() || p.name.is_empty() || p.name.len() > 200)
    {
        return Err(bad(format!(
            "field `points[{i}]`: name must be 1-200 chars and value finite (got {:?} = {})",
            p.name, p.value
        )));
    }
    open_run_view(&ctx, id).await?;
    let n = body.points.len();
    // Events stay well under the store's record limit: one atomic append of
    // JobMetrics events of at most 1,000 points each.
    let events: Vec<HerdEvent> = body
        .points
        .chunks(1000)
        .map(|c| HerdEvent::JobMetrics {
            job: id,
            attempt: 0,
            points: c.to_vec(),
        })
        .collect();
    let seq = ctx
        .state
        .record(&streams::job(id), events)
        .await
        .map_err(internal)?;
    ok(json!({"accepted": n, "seq": seq}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewArtifact {
    name: String,
    hash: String,
    artifact: String,
    #[serde(default)]
    summary: Value,
}

async fn log_artifact(id: Uuid, ctx: Ctx, body: NewArtifact) -> Res {
    herd_store::blob::validate_id(&body.hash).map_err(|e| bad(format!("field `hash`: {e}")))?;
    if !ctx.state.store.blobs.contains(&body.hash) {
        return Err(bad(format!(
            "field `hash`: blob {} was not uploaded",
            body.hash
        )));
    }
    open_run_view(&ctx, id).await?;
    let event = HerdEvent::JobOutput {
        job: id,
        name: body.name,
        hash: body.hash,
        artifact: body.artifact,
        summary: body.summary,
    };
    ctx.state
        .record_one(&streams::job(id), event)
        .await
        .map_err(internal)?;
    ok(json!({"ok": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseRun {
    status: String,
    #[serde(default)]
    reason: String,
}

async fn close_run(id: Uuid, ctx: Ctx, body: CloseRun) -> Res {
    open_run_view(&ctx, id).await?;
    let event = match body.status.as_str() {
        "succeeded" => HerdEvent::JobSucceeded {
            job: id,
            summary: json!({"reason": body.reason}),
        },
        "failed" => HerdEvent::JobFailed {
            job: id,
            reason: body.reason,
        },
        other => {
            return Err(bad(format!(
                "field `status`: {other:?} is not succeeded or failed"
            )))
        }
    };
    ctx.state
        .record_one(&streams::job(id), event)
        .await
        .map_err(internal)?;
    ok(json!({"ok": true}))
}

// ---------- lineage, events, verify, status

async fn lineage(hash: String, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let tree = p
        .lineage(&hash)
        .ok_or_else(|| not_found(format!("no recorded artifact {hash}")))?;
    ok(json!(tree))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    from: Option<u64>,
}

async fn events(ctx: Ctx, q: EventsQuery) -> Res {
    let sub = ctx.state.store.log.subscribe(q.from.unwrap_or(1));
    let stream = futures_util::stream::unfold(sub, |mut sub| async move {
        match sub.next().await {
            Ok(rec) => {
                let ev = warp::sse::Event::default()
                    .id(rec.seq.to_string())
                    .event(rec.event_type.clone())
                    .json_data(&rec)
                    .ok()?;
                Some((Ok::<_, Infallible>(ev), sub))
            }
            Err(_) => None,
        }
    });
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(stream)).into_response())
}

/// Everything that can be checked: the hash chain and its indexes, every
/// blob's bytes, every recorded artifact's blob (and a tree's files) still
/// present, and every materialized checkpoint in the cache still equal to
/// its blobs. Each problem is listed; `ok` only when there are none.
async fn verify(ctx: Ctx) -> Res {
    let referenced: Vec<(String, String, String)> = {
        let p = ctx.state.projection.read().await;
        p.artifacts
            .values()
            .map(|a| (a.hash.clone(), a.artifact.clone(), a.name.clone()))
            .collect()
    };
    let state = ctx.state.clone();
    let (report, problems) = tokio::task::spawn_blocking(move || {
        let store = &state.store;
        let mut problems: Vec<String> = vec![];
        let chain = store.log.verify_chain().map_err(|e| problems.push(e.to_string())).ok();
        let blobs = store.blobs.verify_all().map_err(|e| problems.push(e.to_string())).ok();
        for (hash, artifact, name) in &referenced {
            if !store.blobs.contains(hash) {
                problems.push(format!("{artifact} {hash} ({name:?}) is recorded but its blob is missing"));
                continue;
            }
            let tree = (artifact == "checkpoint").then(|| store.blobs.tree(hash).ok()).flatten();
            if let Some(tree) = tree {
                for f in tree.files.iter().filter(|f| !store.blobs.contains(&f.blob)) {
                    problems.push(format!(
                        "{artifact} {hash} ({name:?}): file {} (blob {}) is missing",
                        f.name, f.blob
                    ));
                }
            }
        }
        let cache = state.data_dir.join("cache").join("trees");
        let mut cached: Vec<_> = std::fs::read_dir(&cache)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        cached.sort();
        for dir in cached.iter().filter(|d| d.join(".complete").exists()) {
            let hash = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if let Err(e) = store.blobs.check_materialized(&hash, dir) {
                problems.push(format!(
                    "cached checkpoint {hash} differs from its blobs ({e}); it is materialized again before any job uses it"
                ));
            }
        }
        (json!({"chain": chain, "blobs": blobs, "artifacts_checked": referenced.len()}), problems)
    })
    .await
    .map_err(internal)?;
    let problems: Vec<String> = problems.iter().map(|p| ctx.state.without_server_paths(p)).collect();
    ok(json!({
        "ok": problems.is_empty(),
        "report": report,
        "problems": problems,
        "error": problems.join("; "),
    }))
}

async fn status(ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let count = |s: JobStatus| p.jobs.values().filter(|j| j.status == s).count();
    ok(json!({
        "devices": ctx.scheduler.devices(),
        "head_seq": p.last_seq,
        "jobs": {"queued": count(JobStatus::Queued), "running": count(JobStatus::Running), "succeeded": count(JobStatus::Succeeded),
                  "failed": count(JobStatus::Failed), "cancelled": count(JobStatus::Cancelled)},
    }))
}
