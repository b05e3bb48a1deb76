//! External runs: training that happens outside herd, recorded like a job
//! (hyperparameters, metrics, artifacts, outcome).

use super::*;
use herd_core::wire::{MetricBatch, MetricsAccepted, NewRun, RunEnded, RunOutput};

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
        warp::path!("runs")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(open_run)
            .boxed(),
        warp::path!("runs" / Uuid / "metrics")
            .and(warp::post())
            .and(c.clone())
            .and(flat_json_body())
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
    ]
}

async fn open_run(ctx: Ctx, body: NewRun) -> Res {
    let id = open(&ctx, body).await?;
    created(json!(Created { id }))
}

/// Record a new external run (its submission and start); its id.
pub(super) async fn open(ctx: &Ctx, body: NewRun) -> Result<Uuid, Rejection> {
    herd_core::vocab::check_name(&body.name).map_err(|e| bad(format!("field `name`: {e}")))?;
    if !(body.hyperparameters.is_object() || body.hyperparameters.is_null()) {
        return Err(bad(
            "field `hyperparameters`: an object of name -> value (a run's settings are looked up by name)".to_string(),
        ));
    }
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
            kind: JobKind::External,
            inputs: BTreeMap::new(),
            hyperparameters: body.hyperparameters.clone(),
            seed: 0,
            depends_on: vec![],
            priority: 0,
            reproduces: None,
            resources: Default::default(),
        },
        HerdEvent::JobStarted {
            job: id,
            attempt: 1,
            device: "external".into(),
            pid: None,
            executor: None,
            slurm_job: None,
            engine_version: "external".into(),
            threads: 0,
            resolved_inputs: BTreeMap::new(),
            effective_hyperparameters: body.hyperparameters,
            fingerprint: BTreeMap::new(),
        },
    ];
    ctx.state.record(&stream, events).await.map_err(internal)?;
    Ok(id)
}

pub(super) async fn open_run_view(ctx: &Ctx, id: Uuid) -> Result<(), Rejection> {
    let p = ctx.state.projection.read().await;
    let j = p
        .rows
        .get(&id)
        .ok_or_else(|| not_found(format!("no run {id}")))?;
    if j.kind != JobKind::External {
        return Err(bad(format!("job {id} is not an external run")));
    }
    if j.status != JobStatus::Running {
        return Err(conflict(format!("run {id} is closed")));
    }
    Ok(())
}

async fn log_metrics(id: Uuid, ctx: Ctx, body: MetricBatch) -> Res {
    let (n, seq) = log(&ctx, id, body.points).await?;
    ok(json!(MetricsAccepted { accepted: n, seq }))
}

/// Record an open run's metric points, each checked (finite, a printable
/// name); how many and the sequence number of the last event.
pub(super) async fn log(
    ctx: &Ctx,
    id: Uuid,
    points: Vec<herd_core::model::MetricPoint>,
) -> Result<(usize, u64), Rejection> {
    let body = MetricBatch { points };
    if body.points.is_empty() || body.points.len() > MAX_POINTS {
        return Err(bad(format!("field `points`: 1 to {MAX_POINTS} points")));
    }
    // Non-finite values are kept: a diverged run's NaN is worth drawing.
    if let Some((i, p, why)) = body.points.iter().enumerate().find_map(|(i, p)| {
        let why = match herd_core::vocab::check_name(&p.name) {
            Err(why) => why,
            Ok(()) if crate::metrics::is_internal(&p.name) => {
                "names starting with `@` are herd's own series".to_string()
            }
            Ok(()) => return None,
        };
        Some((i, p, why))
    }) {
        return Err(bad(format!(
            "field `points[{i}]` ({}): {why}",
            herd_core::vocab::printable(&p.name)
        )));
    }
    open_run_view(ctx, id).await?;
    let n = body.points.len();
    // Events stay well under the store's record limit: one atomic append of
    // JobMetrics events of at most 1,000 points each.
    let mut points = body.points.into_iter().peekable();
    let mut events: Vec<HerdEvent> = vec![];
    while points.peek().is_some() {
        events.push(HerdEvent::JobMetrics {
            job: id,
            attempt: 0,
            points: points.by_ref().take(1000).collect(),
        });
    }
    let seq = ctx
        .state
        .record(&streams::job(id), events)
        .await
        .map_err(internal)?;
    Ok((n, seq))
}

async fn log_artifact(id: Uuid, ctx: Ctx, body: RunOutput) -> Res {
    herd_core::vocab::check_name(&body.name).map_err(|e| bad(format!("field `name`: {e}")))?;
    herd_store::blob::validate_id(&body.hash).map_err(|e| bad(format!("field `hash`: {e}")))?;
    if !ctx.state.store.blobs.contains(&body.hash) {
        return Err(bad(format!(
            "field `hash`: blob {} was not uploaded",
            body.hash
        )));
    }
    // The blob must be what the output claims: a directory tree for a
    // checkpoint or adapter, a dataset of that kind otherwise.
    let (blobs, hash, kind) = (
        ctx.state.store.blobs.clone(),
        body.hash.clone(),
        body.artifact,
    );
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let is_tree = blobs.tree(&hash).is_ok();
        if kind.is_directory() != is_tree {
            return Err(format!(
                "field `artifact`: blob {hash} is {}, not a {kind}",
                if is_tree {
                    "a directory tree"
                } else {
                    "a single file"
                }
            ));
        }
        if let Ok(dataset) = crate::data::DatasetKind::parse(&kind.to_string()) {
            let bytes = blobs.read(&hash).map_err(|e| e.to_string())?;
            crate::data::parse_bytes(dataset, &bytes, &hash).map_err(|e| {
                format!("field `artifact`: blob {hash} is not a {kind} dataset: {e}")
            })?;
        }
        Ok(())
    })
    .await
    .map_err(internal)?
    .map_err(bad)?;
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

async fn close_run(id: Uuid, ctx: Ctx, body: RunEnded) -> Res {
    close(&ctx, id, body).await?;
    ok(json!({"ok": true}))
}

/// End an open run, succeeded or failed.
pub(super) async fn close(ctx: &Ctx, id: Uuid, body: RunEnded) -> Result<(), Rejection> {
    open_run_view(ctx, id).await?;
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
    Ok(())
}
