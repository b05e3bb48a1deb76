//! The HTTP API (warp). JSON in and out; every error is a 4xx/5xx with
//! `{"error": "..."}` saying what is wrong. Request bodies are size-limited;
//! uploads stream into the blob store. Every route but `/health` needs the
//! bearer token. See API.md.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use herd_core::model::{streams, HerdEvent, JobRow, JobStatus, JobView};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::data::{self, DatasetKind};
use crate::jobs::{ArtifactKind, JobKind};
use crate::references::{self, InputRef};
use crate::rounds::RoundSpec;
use crate::scheduler::Scheduler;
use crate::state::State;
use herd_core::wire::{
    ArtifactDetail, ArtifactQuery, BlobStored, Created, ExperimentDetail, Imported, Job, JobQuery,
    JobReproduced, JobRequest, MetricSeries, Reproduction, RoundReproduced, RoundSubmitted,
    TreeFile, TreeListing, Verification, MAX_JOBS_PAGE,
};

mod artifacts;
pub mod bodies;
mod experiments;
mod exports;
mod jobs;
mod kinds;
mod mlflow;
mod record;
mod rounds;
mod runs;

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

/// A typed query string whose error names the parameter at fault (warp's
/// own says only "Invalid query string").
fn query<T: serde::de::DeserializeOwned + Send + 'static>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .and_then(|q: String| async move {
            serde_urlencoded::from_str::<T>(&q).map_err(|e| bad(format!("query string: {e}")))
        })
}

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
/// An error from below the API, as a status chosen by its type: the store
/// refusing an append (too large, too deep, bad stream) is the caller's
/// doing, a full disk is 507, anything else is the server's.
fn internal(e: impl Into<anyhow::Error>) -> Rejection {
    let e: anyhow::Error = e.into();
    let status = match e.downcast_ref::<herd_store::StoreError>() {
        Some(herd_store::StoreError::Invalid(_)) => StatusCode::BAD_REQUEST,
        Some(herd_store::StoreError::NoSpace) => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    warp::reject::custom(ApiError {
        status,
        message: format!("{e:#}"),
    })
}

#[derive(Clone)]
pub struct Ctx {
    pub state: Arc<State>,
    pub scheduler: Arc<Scheduler>,
    pub token: Arc<String>,
    /// The dashboard's login codes and browser sessions.
    pub sessions: Arc<crate::dashboard::Sessions>,
    /// Where the dashboard is served (`http://ADDR`), when it is.
    pub dashboard_url: Option<Arc<String>>,
}

fn with<T: Clone + Send>(x: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || x.clone())
}

fn json_body<T: serde::de::DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    body_of(true)
}

/// A JSON body of a type with no free-form JSON inside (so serde's types
/// already bound its nesting): the depth walk is skipped, which matters for
/// metric batches of 100,000 points.
fn flat_json_body<T: serde::de::DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    body_of(false)
}

fn body_of<T: serde::de::DeserializeOwned + Send>(
    check_depth: bool,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(JSON_LIMIT)
        .and(bodies::permit())
        .and(warp::body::stream())
        .and_then(|permit: bodies::BodyPermit, body| async move {
            let b = bodies::collect(body, JSON_LIMIT).await;
            drop(permit);
            b
        })
        .and_then(move |b: Bytes| async move {
            let too_deep = check_depth
                .then(|| herd_store::event::json_deeper_than(&b, MAX_JSON_DEPTH))
                .flatten();
            if let Some(depth) = too_deep {
                return Err(bad(format!(
                    "invalid JSON body: nested at least {depth} levels deep; the limit is {MAX_JSON_DEPTH}"
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

/// One route of the API, boxed: warp's nested types otherwise overflow the compiler.
type Route = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// Every route of the API behind its auth (the bearer token here; the
/// dashboard's session cookie on its port).
pub(crate) fn api(ctx: &Ctx) -> Route {
    let mut routes: Vec<Route> = vec![];
    routes.extend(experiments::routes(ctx));
    routes.extend(exports::routes(ctx));
    routes.extend(mlflow::routes(ctx));
    routes.extend(artifacts::routes(ctx));
    routes.extend(jobs::routes(ctx));
    routes.extend(rounds::routes(ctx));
    routes.extend(runs::routes(ctx));
    routes.extend(record::routes(ctx));
    routes.extend(kinds::routes(ctx));
    // Boxed and folded one by one: warp's nested types otherwise overflow the compiler.
    routes
        .into_iter()
        .reduce(|a, b| a.or(b).unify().boxed())
        .expect("routes")
}

pub fn routes(ctx: Ctx) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let health = warp::path!("health").and(warp::get()).map(|| {
        warp::reply::json(&json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
            .into_response()
    });
    let api = api(&ctx);
    let state = ctx.state.clone();
    health
        .or(auth(ctx.token.clone()).and(api))
        .unify()
        .recover(move |err| recover(err, state.clone()))
}

/// Every rejection as `{"error": ...}`. Server paths become `DATA/...`:
/// a client has no business knowing where the data directory lives.
pub(crate) async fn recover(err: Rejection, state: Arc<State>) -> Result<impl Reply, Infallible> {
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
    let mut reply = warp::reply::with_status(warp::reply::json(&json!({"error": message})), status)
        .into_response();
    // A body left unread (too large, stalled, refused at the gate): close
    // the connection rather than wait for the rest of it.
    if matches!(
        status,
        StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::SERVICE_UNAVAILABLE
    ) {
        reply.headers_mut().insert(
            warp::http::header::CONNECTION,
            warp::http::HeaderValue::from_static("close"),
        );
    }
    Ok(reply)
}

type Res = Result<warp::reply::Response, Rejection>;

fn ok(v: Value) -> Res {
    Ok(warp::reply::json(&v).into_response())
}

/// 200 with a typed body, serialized once (no JSON tree in between).
fn reply_json<T: Serialize>(v: &T) -> Res {
    Ok(warp::reply::json(v).into_response())
}

fn created(v: Value) -> Res {
    Ok(warp::reply::with_status(warp::reply::json(&v), StatusCode::CREATED).into_response())
}

/// A response body read from `reader` on a blocking thread, 1 MiB at a
/// time (blob downloads, GGUF exports): memory stays flat whatever the size.
fn stream_reader(reader: impl std::io::Read + Send + 'static) -> warp::hyper::Body {
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
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    warp::hyper::Body::wrap_stream(stream)
}
