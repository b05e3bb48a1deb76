//! The subset of MLflow's tracking REST API that clients use to log, under
//! `/api/2.0/mlflow/`, so a training script written for MLflow (or
//! transformers' and TRL's `report_to="mlflow"`) records into herd with
//! `MLFLOW_TRACKING_URI=http://HOST:PORT` and `MLFLOW_TRACKING_TOKEN` set
//! to herd's token. An MLflow experiment is a herd experiment (experiment
//! "0", MLflow's Default, is none); a run is an external run, every herd
//! job reads back as one. Parameters and tags are `RunLogged` events;
//! metrics are the same events `/runs` records. Answers and errors have
//! MLflow's shapes (`{"error_code": "RESOURCE_DOES_NOT_EXIST", ...}`), as
//! its clients branch on them.
//!
//! Not served, answered `501 NOT_IMPLEMENTED` naming the call: artifacts
//! (log them with `herd import` and `/runs/{id}/artifacts`), deletes
//! (herd's record is append-only), models, traces.

mod search;

use super::*;
use herd_core::model::MetricPoint;
use herd_core::number::Number;
use herd_core::wire::{NewExperiment, NewRun, RunEnded};
use search::search_runs;

/// MLflow's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    // `/api/2.0/mlflow/GROUP/ACTION`, e.g. `runs/log-batch`.
    fn at(path: &'static str) -> warp::filters::BoxedFilter<()> {
        let (group, action) = path.split_once('/').expect("GROUP/ACTION");
        warp::path("api")
            .and(warp::path("2.0"))
            .and(warp::path("mlflow"))
            .and(warp::path(group))
            .and(warp::path(action))
            .and(warp::path::end())
            .boxed()
    }
    macro_rules! post {
        ($path:literal, $handler:ident) => {
            at($path)
                .and(warp::post())
                .and(c.clone())
                .and(warp::body::content_length_limit(MAX_BODY))
                .and(warp::body::bytes())
                .and_then(|ctx: Ctx, body: Bytes| async move {
                    Ok::<_, Rejection>(answer(match parse(&body) {
                        Ok(body) => $handler(&ctx, body).await,
                        Err(e) => Err(e),
                    }))
                })
                .boxed()
        };
    }
    macro_rules! get {
        ($path:literal, $handler:ident) => {
            at($path)
                .and(warp::get())
                .and(c.clone())
                .and(query::<BTreeMap<String, String>>())
                .and_then(|ctx: Ctx, q: BTreeMap<String, String>| async move {
                    Ok::<_, Rejection>(answer($handler(&ctx, q).await))
                })
                .boxed()
        };
    }
    vec![
        post!("experiments/create", create_experiment),
        get!("experiments/get-by-name", get_experiment_by_name),
        get!("experiments/get", get_experiment),
        post!("runs/create", create_run),
        post!("runs/update", update_run),
        get!("runs/get", get_run),
        post!("runs/log-batch", log_batch),
        post!("runs/log-metric", log_metric),
        post!("runs/log-parameter", log_parameter),
        post!("runs/set-tag", set_tag),
        post!("runs/search", search_runs),
        get!("metrics/get-history", get_metric_history),
        // Anything else under the prefix: 501 naming the call, so a client
        // says what it lacks instead of a bare 404.
        warp::path("api")
            .and(warp::path("2.0"))
            .and(warp::path("mlflow"))
            .and(warp::path::tail())
            .and(warp::method())
            .map(|tail: warp::path::Tail, method: warp::http::Method| {
                answer(Err(Failure {
                    status: StatusCode::NOT_IMPLEMENTED,
                    code: "NOT_IMPLEMENTED",
                    message: format!(
                        "herd does not serve MLflow's `{method} {}`; it answers {}",
                        tail.as_str(),
                        ANSWERED.join(", ")
                    ),
                }))
            })
            .boxed(),
    ]
}

/// The MLflow calls herd answers (the 501 for any other lists them).
const ANSWERED: &[&str] = &[
    "experiments/create",
    "experiments/get-by-name",
    "experiments/get",
    "runs/create",
    "runs/update",
    "runs/get",
    "runs/log-batch",
    "runs/log-metric",
    "runs/log-parameter",
    "runs/set-tag",
    "runs/search",
    "metrics/get-history",
];

/// The largest MLflow request body (a log-batch is at most 1,000 metrics,
/// 100 params and 100 tags in MLflow itself).
const MAX_BODY: u64 = 4 << 20;

/// An MLflow error: its code names the kind, as MLflow's clients read it.
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

type Answer = Result<Value, Failure>;

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        status: StatusCode::BAD_REQUEST,
        code: "INVALID_PARAMETER_VALUE",
        message: message.into(),
    }
}

fn missing(message: impl Into<String>) -> Failure {
    Failure {
        status: StatusCode::NOT_FOUND,
        code: "RESOURCE_DOES_NOT_EXIST",
        message: message.into(),
    }
}

/// herd's own refusals in MLflow's words.
fn from_rejection(r: Rejection) -> Failure {
    match r.find::<ApiError>() {
        Some(e) => Failure {
            status: e.status,
            code: match e.status {
                StatusCode::NOT_FOUND => "RESOURCE_DOES_NOT_EXIST",
                StatusCode::CONFLICT if e.message.contains("exists") => "RESOURCE_ALREADY_EXISTS",
                StatusCode::CONFLICT => "INVALID_STATE",
                s if s.is_server_error() => "INTERNAL_ERROR",
                _ => "INVALID_PARAMETER_VALUE",
            },
            message: e.message.clone(),
        },
        None => Failure {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "INTERNAL_ERROR",
            message: format!("{r:?}"),
        },
    }
}

fn answer(a: Answer) -> warp::reply::Response {
    match a {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(f) => warp::reply::with_status(
            warp::reply::json(&json!({"error_code": f.code, "message": f.message})),
            f.status,
        )
        .into_response(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("request body: {e}")))
}

/// A run as MLflow's clients name it: `run_id`, `run_uuid` (older), often both.
#[derive(Deserialize, Default)]
struct RunRef {
    #[serde(default)]
    run_id: String,
    #[serde(default)]
    run_uuid: String,
}

impl RunRef {
    fn id(&self) -> Result<Uuid, Failure> {
        let id = if self.run_id.is_empty() {
            &self.run_uuid
        } else {
            &self.run_id
        };
        run_of(id)
    }
}

/// A key/value pair as MLflow sends params and tags.
#[derive(Deserialize, Serialize, Clone)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize, Serialize, Clone)]
struct Metric {
    key: String,
    #[serde(with = "herd_core::number::value")]
    value: f64,
    #[serde(default)]
    timestamp: i64,
    #[serde(default)]
    step: i64,
}

fn experiment_json(e: &herd_core::model::ExperimentView) -> Value {
    json!({"experiment_id": e.id.to_string(), "name": e.name, "artifact_location": "",
           "lifecycle_stage": "active", "creation_time": e.created_ms, "last_update_time": e.created_ms,
           "tags": if e.description.is_empty() { json!([]) } else { json!([{"key": "mlflow.note.content", "value": e.description}]) }})
}

fn default_experiment() -> Value {
    json!({"experiment_id": "0", "name": "Default", "artifact_location": "",
           "lifecycle_stage": "active", "tags": []})
}

#[derive(Deserialize)]
struct CreateExperiment {
    name: String,
    #[serde(default)]
    tags: Vec<KeyValue>,
}

async fn create_experiment(ctx: &Ctx, body: CreateExperiment) -> Answer {
    let description = body
        .tags
        .iter()
        .find(|t| t.key == "mlflow.note.content")
        .map_or(String::new(), |t| t.value.clone());
    let id = super::experiments::create(
        ctx,
        NewExperiment {
            name: body.name,
            description,
        },
    )
    .await
    .map_err(from_rejection)?;
    Ok(json!({"experiment_id": id.to_string()}))
}

async fn get_experiment_by_name(ctx: &Ctx, q: BTreeMap<String, String>) -> Answer {
    let name = q
        .get("experiment_name")
        .ok_or_else(|| invalid("missing query parameter `experiment_name`"))?;
    if name == "Default" {
        return Ok(json!({"experiment": default_experiment()}));
    }
    let p = ctx.state.projection.read().await;
    p.experiments
        .values()
        .find(|e| &e.name == name)
        .map(|e| json!({"experiment": experiment_json(e)}))
        .ok_or_else(|| missing(format!("no experiment named {name:?}")))
}

async fn get_experiment(ctx: &Ctx, q: BTreeMap<String, String>) -> Answer {
    let id = q
        .get("experiment_id")
        .ok_or_else(|| invalid("missing query parameter `experiment_id`"))?;
    if id == "0" {
        return Ok(json!({"experiment": default_experiment()}));
    }
    let uuid: Uuid = id
        .parse()
        .map_err(|_| missing(format!("no experiment {id}")))?;
    let p = ctx.state.projection.read().await;
    p.experiments
        .get(&uuid)
        .map(|e| json!({"experiment": experiment_json(e)}))
        .ok_or_else(|| missing(format!("no experiment {id}")))
}

/// MLflow's experiment id as herd's: "0" (Default) is none.
fn experiment_of(id: &str) -> Result<Option<Uuid>, Failure> {
    if id.is_empty() || id == "0" {
        return Ok(None);
    }
    id.parse()
        .map(Some)
        .map_err(|_| missing(format!("no experiment {id}")))
}

fn run_of(id: &str) -> Result<Uuid, Failure> {
    id.parse().map_err(|_| missing(format!("no run {id}")))
}

/// A param's value as herd keeps hyperparameters: numbers as numbers (so
/// history filters and sorts on them), the rest as the text MLflow sent.
fn param_value(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return json!(i);
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => json!(x),
        _ => json!(v),
    }
}

fn mlflow_status(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Queued => "SCHEDULED",
        JobStatus::Running => "RUNNING",
        JobStatus::Succeeded => "FINISHED",
        JobStatus::Failed | JobStatus::Interrupted => "FAILED",
        JobStatus::Cancelled => "KILLED",
    }
}

fn run_info(j: &JobView) -> Value {
    let id = j.id.to_string();
    json!({"run_id": id, "run_uuid": id, "run_name": j.name,
           "experiment_id": j.experiment.map_or("0".to_string(), |e| e.to_string()),
           "user_id": "", "status": mlflow_status(j.status),
           "start_time": j.started_ms.unwrap_or(j.submitted_ms), "end_time": j.finished_ms,
           "artifact_uri": "", "lifecycle_stage": "active"})
}

fn run_json(j: &JobView) -> Value {
    let shown = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let hp = if j.effective_hyperparameters.is_object() {
        &j.effective_hyperparameters
    } else {
        &j.hyperparameters
    };
    let params: Vec<Value> = hp
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| json!({"key": k, "value": shown(v)}))
        .collect();
    let mut tags: Vec<Value> = j
        .tags
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    if !j.tags.contains_key("mlflow.runName") {
        tags.push(json!({"key": "mlflow.runName", "value": j.name}));
    }
    let start = j.started_ms.unwrap_or(j.submitted_ms);
    let metrics: Vec<Value> = j
        .last_metrics
        .iter()
        .map(|(k, (step, v))| json!({"key": k, "value": Number(*v), "step": step, "timestamp": start}))
        .collect();
    json!({"info": run_info(j), "data": {"metrics": metrics, "params": params, "tags": tags}, "inputs": {}})
}

async fn view(ctx: &Ctx, id: Uuid) -> Result<JobView, Failure> {
    let p = ctx.state.projection.read().await;
    p.job(id)
        .map_err(|e| from_rejection(internal(e)))?
        .map(|j| j.into_owned())
        .ok_or_else(|| missing(format!("no run {id}")))
}

#[derive(Deserialize)]
struct CreateRun {
    #[serde(default)]
    experiment_id: String,
    #[serde(default)]
    run_name: Option<String>,
    #[serde(default)]
    tags: Vec<KeyValue>,
}

async fn create_run(ctx: &Ctx, body: CreateRun) -> Answer {
    let experiment = experiment_of(&body.experiment_id)?;
    let name = body
        .run_name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            body.tags
                .iter()
                .find(|t| t.key == "mlflow.runName")
                .map(|t| t.value.clone())
        })
        .unwrap_or_else(|| "mlflow-run".to_string());
    let id = super::runs::open(
        ctx,
        NewRun {
            name,
            experiment,
            hyperparameters: json!({}),
        },
    )
    .await
    .map_err(from_rejection)?;
    if !body.tags.is_empty() {
        record_logged(ctx, id, &[], &body.tags).await?;
    }
    Ok(json!({"run": run_json(&view(ctx, id).await?)}))
}

#[derive(Deserialize)]
struct UpdateRun {
    #[serde(flatten)]
    run: RunRef,
    #[serde(default)]
    status: Option<String>,
}

async fn update_run(ctx: &Ctx, body: UpdateRun) -> Answer {
    let id = body.run.id()?;
    let ended = match body.status.as_deref() {
        None | Some("RUNNING") | Some("SCHEDULED") => None,
        Some("FINISHED") => Some(("succeeded", String::new())),
        Some(s @ ("FAILED" | "KILLED")) => Some(("failed", format!("MLflow status {s}"))),
        Some(other) => return Err(invalid(format!("status {other:?}"))),
    };
    if let Some((status, reason)) = ended {
        super::runs::close(
            ctx,
            id,
            RunEnded {
                status: status.into(),
                reason,
            },
        )
        .await
        .map_err(from_rejection)?;
    }
    Ok(json!({"run_info": run_info(&view(ctx, id).await?)}))
}

async fn get_run(ctx: &Ctx, q: BTreeMap<String, String>) -> Answer {
    let id = q
        .get("run_id")
        .or_else(|| q.get("run_uuid"))
        .ok_or_else(|| invalid("missing query parameter `run_id`"))?;
    Ok(json!({"run": run_json(&view(ctx, run_of(id)?).await?)}))
}

/// Record params and tags as one `RunLogged` event, after checking them:
/// names printable, and a param already logged with another value refused
/// (MLflow's rule: params never change).
async fn record_logged(ctx: &Ctx, id: Uuid, params: &[KeyValue], tags: &[KeyValue]) -> Answer {
    super::runs::open_run_view(ctx, id)
        .await
        .map_err(from_rejection)?;
    let j = view(ctx, id).await?;
    let mut new_params = BTreeMap::new();
    for p in params {
        herd_core::vocab::check_name(&p.key)
            .map_err(|e| invalid(format!("param {:?}: {e}", p.key)))?;
        let v = param_value(&p.value);
        match j.hyperparameters.get(&p.key) {
            Some(old) if *old != v => {
                return Err(invalid(format!(
                "param {:?} was logged as {old} and cannot change to {:?} (params are immutable)",
                p.key, p.value
            )))
            }
            Some(_) => {}
            None => {
                new_params.insert(p.key.clone(), v);
            }
        }
    }
    let mut new_tags = BTreeMap::new();
    for t in tags {
        herd_core::vocab::check_name(&t.key)
            .map_err(|e| invalid(format!("tag {:?}: {e}", t.key)))?;
        new_tags.insert(t.key.clone(), t.value.clone());
    }
    if new_params.is_empty() && new_tags.is_empty() {
        return Ok(json!({}));
    }
    let event = HerdEvent::RunLogged {
        job: id,
        params: new_params,
        tags: new_tags,
    };
    ctx.state
        .record_one(&streams::job(id), event)
        .await
        .map_err(|e| from_rejection(internal(e)))?;
    Ok(json!({}))
}

async fn record_metrics(ctx: &Ctx, id: Uuid, metrics: Vec<Metric>) -> Answer {
    if metrics.is_empty() {
        return Ok(json!({}));
    }
    let points = metrics
        .into_iter()
        .map(|m| {
            let step = u64::try_from(m.step)
                .map_err(|_| invalid(format!("metric {:?}: step {} is negative", m.key, m.step)))?;
            Ok(MetricPoint {
                step,
                name: m.key,
                value: m.value,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    super::runs::log(ctx, id, points)
        .await
        .map_err(from_rejection)?;
    Ok(json!({}))
}

/// The run named in place, not `#[serde(flatten)]`: flattening buffers the
/// whole body (1,000 metrics) as a tree before reading it.
#[derive(Deserialize)]
struct LogBatch {
    #[serde(default)]
    run_id: String,
    #[serde(default)]
    run_uuid: String,
    #[serde(default)]
    metrics: Vec<Metric>,
    #[serde(default)]
    params: Vec<KeyValue>,
    #[serde(default)]
    tags: Vec<KeyValue>,
}

/// Params and tags first, then metrics, each checked before it is recorded.
async fn log_batch(ctx: &Ctx, body: LogBatch) -> Answer {
    let id = RunRef {
        run_id: body.run_id,
        run_uuid: body.run_uuid,
    }
    .id()?;
    record_logged(ctx, id, &body.params, &body.tags).await?;
    record_metrics(ctx, id, body.metrics).await
}

#[derive(Deserialize)]
struct LogMetric {
    #[serde(flatten)]
    run: RunRef,
    #[serde(flatten)]
    metric: Metric,
}

async fn log_metric(ctx: &Ctx, body: LogMetric) -> Answer {
    record_metrics(ctx, body.run.id()?, vec![body.metric]).await
}

#[derive(Deserialize)]
struct LogKeyValue {
    #[serde(flatten)]
    run: RunRef,
    #[serde(flatten)]
    kv: KeyValue,
}

async fn log_parameter(ctx: &Ctx, body: LogKeyValue) -> Answer {
    record_logged(ctx, body.run.id()?, &[body.kv], &[]).await
}

async fn set_tag(ctx: &Ctx, body: LogKeyValue) -> Answer {
    record_logged(ctx, body.run.id()?, &[], &[body.kv]).await
}

async fn get_metric_history(ctx: &Ctx, q: BTreeMap<String, String>) -> Answer {
    let id = run_of(
        q.get("run_id")
            .or_else(|| q.get("run_uuid"))
            .ok_or_else(|| invalid("missing query parameter `run_id`"))?,
    )?;
    let key = q
        .get("metric_key")
        .ok_or_else(|| invalid("missing query parameter `metric_key`"))?;
    let j = view(ctx, id).await?;
    let p = ctx.state.projection.read().await;
    let series = p
        .series(id, j.attempts.max(1), Some(&[key.as_str()]))
        .map_err(|e| from_rejection(internal(e)))?;
    let start = j.started_ms.unwrap_or(j.submitted_ms);
    let metrics: Vec<Value> = series
        .get(key)
        .into_iter()
        .flatten()
        .map(|(step, v)| json!({"key": key, "value": Number(*v), "step": step, "timestamp": start}))
        .collect();
    Ok(json!({"metrics": metrics}))
}
