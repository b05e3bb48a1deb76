//! Jobs: submit (inputs and hyperparameters checked before anything is
//! recorded), history with filters and sort, metrics per attempt, cancel,
//! reproduce.

use super::*;

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
        kind,
        inputs,
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

pub(super) fn job_json(ctx: &Ctx, j: &JobView) -> Value {
    let progress = ctx
        .state
        .progress
        .lock()
        .expect("progress lock")
        .get(&j.id)
        .copied();
    json!(Job {
        view: j.clone(),
        progress
    })
}

async fn list_jobs(ctx: Ctx, q: JobQuery) -> Res {
    let conds = parse_where(q.where_.as_deref().unwrap_or("")).map_err(bad)?;
    let p = ctx.state.projection.read().await;
    let mut out: Vec<&JobView> = p
        .jobs
        .values()
        .filter(|j| q.experiment.is_none() || j.experiment == q.experiment)
        .filter(|j| q.kind.is_none_or(|k| j.kind == k))
        .filter(|j| q.status.is_none_or(|s| j.status == s))
        .filter(|j| q.round.is_none() || j.round == q.round)
        .filter(|j| conds.iter().all(|c| holds(j, c)))
        .collect();
    if let Some(sort) = &q.sort {
        let (desc, key) = sort
            .strip_prefix('-')
            .map(|k| (true, k))
            .unwrap_or((false, sort.as_str()));
        // A total order (a partial one makes the sort panic): jobs without
        // the value come last either way.
        out.sort_by(|a, b| {
            let (x, y) = (job_value(a, key), job_value(b, key));
            match (x.filter(|v| !v.is_nan()), y.filter(|v| !v.is_nan())) {
                (Some(x), Some(y)) if desc => y.total_cmp(&x),
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
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
    let job = p
        .jobs
        .get(&id)
        .ok_or_else(|| not_found(format!("no job {id}")))?;
    let latest = job.attempts;
    let wanted: Option<Vec<&str>> = q.names.as_deref().map(|n| n.split(',').collect());
    let keep = |k: &str| wanted.as_ref().is_none_or(|w| w.contains(&k));
    let attempt = q.attempt.unwrap_or(latest);
    if attempt == latest || latest == 0 {
        let empty = BTreeMap::new();
        let series = p.series.get(&id).unwrap_or(&empty);
        let out: BTreeMap<String, Vec<(u64, f64)>> = series
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return ok(json!(MetricSeries {
            attempt: latest,
            attempts: latest,
            series: out
        }));
    }
    if attempt == 0 || attempt > latest {
        return Err(bad(format!(
            "query `attempt`: job {id} has attempts 1..={latest}, not {attempt}"
        )));
    }
    drop(p);
    let log = ctx.state.store.log.clone();
    let events =
        tokio::task::spawn_blocking(move || log.read_stream(&streams::job(id), 1, usize::MAX))
            .await
            .map_err(internal)?
            .map_err(internal)?;
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for rec in &events {
        if let Ok(HerdEvent::JobMetrics {
            attempt: a, points, ..
        }) = HerdEvent::from_recorded(&crate::state::stored(rec))
        {
            if a == attempt {
                for pt in points.into_iter().filter(|pt| keep(&pt.name)) {
                    series.entry(pt.name).or_default().push((pt.step, pt.value));
                }
            }
        }
    }
    ok(json!(MetricSeries {
        attempt,
        attempts: latest,
        series
    }))
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
        .jobs
        .get(&id)
        .cloned()
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
    created(json!(JobReproduced {
        id: new,
        reproduces: id
    }))
}
