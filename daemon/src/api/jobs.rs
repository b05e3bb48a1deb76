//! Jobs: submit (inputs and hyperparameters checked before anything is
//! recorded), history with filters and sort, metrics per attempt, cancel,
//! reproduce.

use super::*;
use crate::metrics::lod::Window;
use crate::state::Live;
use herd_core::wire::ManyMetricSeries;

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
        warp::path!("jobs")
            .and(warp::post())
            .and(c.clone())
            .and(json_body())
            .and_then(submit_job)
            .boxed(),
        warp::path!("jobs")
            .and(warp::get())
            .and(c.clone())
            .and(query())
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
            .and(query())
            .and_then(get_metrics)
            .boxed(),
        warp::path!("metrics")
            .and(warp::get())
            .and(c.clone())
            .and(query())
            .and_then(get_many_metrics)
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
    ]
}

async fn submit_job(ctx: Ctx, body: JobRequest) -> Res {
    let kind = body.kind;
    // Recorded as written: the text form of each reference.
    let inputs: BTreeMap<String, String> = body
        .inputs
        .iter()
        .map(|(name, r)| (name.clone(), r.to_string()))
        .collect();
    let hp = crate::jobs::effective_hyperparameters(kind, &body.hyperparameters)
        .map_err(|e| bad(format!("field `hyperparameters`: {e}")))?;
    let mut depends_on = body.depends_on.clone();
    {
        let p = ctx.state.projection.read().await;
        if let Some(e) = body.experiment {
            if !p.experiments.contains_key(&e) {
                return Err(bad(format!("field `experiment`: no experiment {e}")));
            }
        }
        references::check_inputs(&p, &BTreeMap::new(), kind, &inputs)
            .map_err(|e| bad(format!("field `inputs`: {e}")))?;
        crate::jobs::check_with_inputs(kind, &hp, &inputs)
            .map_err(|e| bad(format!("field `hyperparameters`: {e}")))?;
        for (name, v) in &body.inputs {
            match v {
                InputRef::JobOutput { job, .. } => {
                    if !depends_on.contains(job) {
                        depends_on.push(*job);
                    }
                }
                InputRef::Blob(hash) if !ctx.state.store.blobs.contains(hash.as_str()) => {
                    return Err(bad(format!(
                        "field `inputs.{name}`: blob {hash} is recorded but missing from the blob store (run `herd verify`)"
                    )));
                }
                InputRef::Blob(_) => {}
            }
        }
        for d in &depends_on {
            if !p.has_job(d) {
                return Err(bad(format!("field `depends_on`: no job {d}")));
            }
        }
    }
    if let Some(name) = &body.name {
        herd_core::vocab::check_name(name).map_err(|e| bad(format!("field `name`: {e}")))?;
    }
    let id = Uuid::now_v7();
    let event = HerdEvent::JobSubmitted {
        job: id,
        experiment: body.experiment,
        round: None,
        name: body.name.unwrap_or_else(|| kind.as_str().to_string()),
        kind,
        inputs,
        hyperparameters: hp.clone(),
        seed: body.seed,
        depends_on,
        priority: body.priority,
        reproduces: None,
        resources: body.resources,
    };
    ctx.state
        .record_one(&streams::job(id), event)
        .await
        .map_err(internal)?;
    created(json!({"id": id, "effective_hyperparameters": hp}))
}

/// A job's value for `where` and `sort`, from its row.
fn job_value(j: &JobRow, key: &str) -> Option<f64> {
    let (scope, name) = key.split_once('.').unwrap_or(("", key));
    let hp = || j.hp(name);
    let metric = || j.metric(name);
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

fn holds(j: &JobRow, (k, op, v): &Condition) -> bool {
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

pub(super) fn job_json(ctx: &Ctx, j: &JobView) -> Value {
    json!(job_of(ctx, j))
}

/// A job as the API answers it: its view and, while it runs, its progress.
pub(super) fn job_of(ctx: &Ctx, j: &JobView) -> Job {
    let progress = ctx
        .state
        .progress
        .lock()
        .expect("progress lock")
        .get(&j.id)
        .copied();
    Job {
        view: j.clone(),
        progress,
    }
}

/// Refuse a `where` or `sort` key that no recorded job has (a typo would
/// otherwise filter everything out, or sort nothing, and answer 200).
fn known_key(
    rows: &std::collections::BTreeMap<Uuid, JobRow>,
    key: &str,
    what: &str,
) -> Result<(), String> {
    // Every job has these; any other key must be one some job has (with no
    // jobs at all, none does: a typo is a typo on an empty store too).
    if matches!(key, "submitted" | "seed") || rows.values().any(|j| job_value(j, key).is_some()) {
        return Ok(());
    }
    // The keys jobs have, for a did-you-mean.
    let mut present = std::collections::BTreeSet::new();
    for j in rows.values() {
        present.extend(j.hp.iter().map(|(k, _)| format!("hp.{k}")));
        present.extend(j.metrics.iter().map(|(k, _)| format!("metric.{k}")));
    }
    let typed = key
        .strip_prefix("hp.")
        .or(key.strip_prefix("metric."))
        .unwrap_or(key);
    // Names compared without their prefix; the key suggested with it.
    let bare = |k: &'_ str| k.split_once('.').map_or(k, |(_, n)| n).to_string();
    let names: Vec<String> = present.iter().map(|k| bare(k)).collect();
    let near = herd_core::vocab::nearest(typed, names.iter().map(String::as_str))
        .and_then(|n| present.iter().find(|k| bare(k) == n));
    let hint = match near {
        Some(k) => format!("did you mean `{k}`?"),
        None => {
            "keys: submitted, seed, hp.NAME, metric.NAME; `herd history` shows the names".into()
        }
    };
    Err(format!("{what}: no job has `{key}`; {hint}"))
}

async fn list_jobs(ctx: Ctx, q: JobQuery) -> Res {
    let conds = parse_where(q.where_.as_deref().unwrap_or("")).map_err(bad)?;
    let limit = q.limit.unwrap_or(MAX_JOBS_PAGE);
    if limit > MAX_JOBS_PAGE {
        return Err(bad(format!(
            "query `limit`: at most {MAX_JOBS_PAGE} jobs per request, not {limit}; page with `offset`"
        )));
    }
    let ids: Option<std::collections::HashSet<Uuid>> = match &q.ids {
        None => None,
        Some(ids) => Some(job_ids("ids", ids)?.into_iter().collect()),
    };
    let p = ctx.state.projection.read().await;
    for (k, _, _) in &conds {
        known_key(&p.rows, k, "query `where`").map_err(bad)?;
    }
    if let Some(sort) = &q.sort {
        known_key(
            &p.rows,
            sort.strip_prefix('-').unwrap_or(sort),
            "query `sort`",
        )
        .map_err(bad)?;
    }
    // Filter and sort on the rows (in memory for every job); read full views
    // only for the page asked for.
    let mut out: Vec<(&Uuid, &JobRow)> = p
        .rows
        .iter()
        .filter(|(id, _)| ids.as_ref().is_none_or(|ids| ids.contains(id)))
        .filter(|(_, j)| q.experiment.is_none() || j.experiment == q.experiment)
        .filter(|(_, j)| q.kind.is_none_or(|k| j.kind == k))
        .filter(|(_, j)| q.status.is_none_or(|s| j.status == s))
        .filter(|(_, j)| q.round.is_none() || j.round == q.round)
        .filter(|(_, j)| conds.iter().all(|c| holds(j, c)))
        .collect();
    if let Some(sort) = &q.sort {
        let (desc, key) = sort
            .strip_prefix('-')
            .map(|k| (true, k))
            .unwrap_or((false, sort.as_str()));
        // Each job's key computed once. A total order (a partial one makes
        // the sort panic): jobs without the value come last either way; ties
        // keep submission order (the sort is stable).
        let mut keyed: Vec<(Option<f64>, (&Uuid, &JobRow))> = out
            .into_iter()
            .map(|(id, j)| (job_value(j, key).filter(|v| !v.is_nan()), (id, j)))
            .collect();
        keyed.sort_by(|(x, _), (y, _)| match (x, y) {
            (Some(x), Some(y)) if desc => y.total_cmp(x),
            (Some(x), Some(y)) => x.total_cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        out = keyed.into_iter().map(|(_, j)| j).collect();
    }
    let total = out.len();
    let mut page = vec![];
    for (id, _) in out.into_iter().skip(q.offset.unwrap_or(0)).take(limit) {
        if let Some(j) = p.job(*id).map_err(internal)? {
            page.push(job_of(&ctx, &j));
        }
    }
    let mut reply = reply_json(&page)?;
    reply.headers_mut().insert("herd-total", total.into());
    Ok(reply)
}

async fn get_job(id: Uuid, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let j = p
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    ok(job_json(&ctx, &j))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsQuery {
    /// Comma-separated metric names; all when absent.
    #[serde(alias = "name")]
    names: Option<String>,
    /// Which attempt's points (1-based); the latest when absent.
    attempt: Option<u32>,
    /// Sample each series for this many pixels (see `metrics/lod.rs`).
    points: Option<usize>,
    /// Only points with `from <= step <= to`.
    from: Option<u64>,
    to: Option<u64>,
}

/// The most pixels a sample is asked for: a chart on a wide screen.
const MAX_SAMPLE: usize = 100_000;

/// A job's metric series: the latest attempt's, or an earlier one's, from
/// the metric index (see `metrics/mod.rs`); whole, or sampled for a chart.
async fn get_metrics(id: Uuid, ctx: Ctx, q: MetricsQuery) -> Res {
    let p = ctx.state.projection.read().await;
    reply_json(&metric_series(&p, id, &q)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyMetricsQuery {
    /// Comma-separated job ids.
    jobs: String,
    names: Option<String>,
    points: usize,
    from: Option<u64>,
    to: Option<u64>,
}

/// Comma-separated job ids from query parameter `field`.
fn job_ids(field: &str, text: &str) -> Result<Vec<Uuid>, Rejection> {
    text.split(',')
        .map(|s| {
            s.parse::<Uuid>()
                .map_err(|_| bad(format!("query `{field}`: {s:?} is not a job id")))
        })
        .collect()
}

/// The most jobs one `GET /metrics` samples (the dashboard's compare).
const MAX_COMPARED: usize = 500;

/// Many jobs' series sampled in one request: a compare of 200 jobs is one
/// answer, not 200.
async fn get_many_metrics(ctx: Ctx, q: ManyMetricsQuery) -> Res {
    let ids = job_ids("jobs", &q.jobs)?;
    if ids.len() > MAX_COMPARED {
        return Err(bad(format!(
            "query `jobs`: at most {MAX_COMPARED} jobs, not {}",
            ids.len()
        )));
    }
    // One answer stays bounded: each series' sample is up to ~3N points.
    if ids.len().saturating_mul(q.points) > MAX_SAMPLE * 10 {
        return Err(bad(format!(
            "query `points`: {} jobs x {} points is over {}; ask for fewer points per job",
            ids.len(),
            q.points,
            MAX_SAMPLE * 10
        )));
    }
    let one = MetricsQuery {
        names: q.names,
        attempt: None,
        points: Some(q.points),
        from: q.from,
        to: q.to,
    };
    let p = ctx.state.projection.read().await;
    let mut jobs = BTreeMap::new();
    for id in ids {
        jobs.insert(id, metric_series(&p, id, &one)?);
    }
    reply_json(&ManyMetricSeries { jobs })
}

fn metric_series(p: &Live, id: Uuid, q: &MetricsQuery) -> Result<MetricSeries, Rejection> {
    let latest = p
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no job {id}")))?
        .attempts;
    let attempt = q.attempt.unwrap_or(latest);
    if attempt != latest && (attempt == 0 || attempt > latest) {
        return Err(bad(format!(
            "query `attempt`: job {id} has attempts 1..={latest}, not {attempt}"
        )));
    }
    let wanted: Option<Vec<&str>> = q.names.as_deref().map(|n| n.split(',').collect());
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if from > to {
            return Err(bad(format!("query `from` ({from}) is after `to` ({to})")));
        }
    }
    if q.points.is_none() && (q.from.is_some() || q.to.is_some()) {
        return Err(bad(
            "query `from`/`to`: give `points` too (the sample's pixel width)",
        ));
    }
    let Some(points) = q.points else {
        let series = p.series(id, attempt, wanted.as_deref()).map_err(internal)?;
        return Ok(MetricSeries {
            attempt,
            attempts: latest,
            series,
            counts: Default::default(),
        });
    };
    if !(1..=MAX_SAMPLE).contains(&points) {
        return Err(bad(format!(
            "query `points`: 1 to {MAX_SAMPLE} (a chart's width in pixels), not {points}"
        )));
    }
    let window = Window {
        from: q.from,
        to: q.to,
    };
    let sampled = p
        .sampled(id, attempt, wanted.as_deref(), points, window)
        .map_err(internal)?;
    let counts = sampled.iter().map(|(k, s)| (k.clone(), s.count)).collect();
    let series = sampled.into_iter().map(|(k, s)| (k, s.points)).collect();
    Ok(MetricSeries {
        attempt,
        attempts: latest,
        series,
        counts,
    })
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
pub(super) async fn reproduce_one(ctx: &Ctx, id: Uuid) -> Result<Uuid, Rejection> {
    let j = ctx
        .state
        .projection
        .read()
        .await
        .job(id)
        .map_err(internal)?
        .map(|j| j.into_owned())
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    if j.kind == JobKind::External {
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
        kind: j.kind,
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
        resources: j.resources,
    };
    ctx.state
        .record_one(&streams::job(new), event)
        .await
        .map_err(internal)?;
    Ok(new)
}

async fn reproduce_job(id: Uuid, ctx: Ctx) -> Res {
    let new = reproduce_one(&ctx, id).await?;
    created(json!(JobReproduced {
        id: new,
        reproduces: id
    }))
}
