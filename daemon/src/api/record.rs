//! The record itself: lineage, the live event stream, verification, status.

use super::*;

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
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
        warp::path!("resolve" / String)
            .and(warp::get())
            .and(c.clone())
            .and_then(resolve)
            .boxed(),
        warp::path!("dashboard" / "codes")
            .and(warp::post())
            .and(c.clone())
            .and_then(login_code)
            .boxed(),
    ]
}

/// What a short id or hash stands for: the jobs, rounds, experiments and
/// artifacts whose id starts with it (range scans of the sorted views).
async fn resolve(prefix: String, ctx: Ctx) -> Res {
    use herd_core::wire::{IdMatch, Resolved, MAX_ID_MATCHES, MIN_ID_PREFIX};
    let hex: String = prefix
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() < MIN_ID_PREFIX || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "{:?} is not an id prefix: give at least {MIN_ID_PREFIX} hex characters of an id or hash",
            herd_core::vocab::printable(&prefix)
        )));
    }
    let p = ctx.state.projection.read().await;
    let mut matches = vec![];
    // UUIDs sort as their bytes, so a prefix is a range.
    if hex.len() <= 32 {
        let lo = Uuid::parse_str(&format!("{hex:0<32}")).map_err(internal)?;
        let hi = Uuid::parse_str(&format!("{hex:f<32}")).map_err(internal)?;
        for id in p
            .rows
            .range(lo..=hi)
            .map(|(id, _)| *id)
            .take(MAX_ID_MATCHES + 1)
        {
            let name = p.job(id).map_err(internal)?.map(|j| j.name.clone());
            matches.push(IdMatch {
                what: "job".into(),
                id: id.to_string(),
                name: name.unwrap_or_default(),
            });
        }
        for (id, r) in p.rounds.range(lo..=hi).take(MAX_ID_MATCHES + 1) {
            matches.push(IdMatch {
                what: "round".into(),
                id: id.to_string(),
                name: format!("round {}", r.index),
            });
        }
        for (id, e) in p.experiments.range(lo..=hi).take(MAX_ID_MATCHES + 1) {
            matches.push(IdMatch {
                what: "experiment".into(),
                id: id.to_string(),
                name: e.name.clone(),
            });
        }
    }
    for (hash, a) in p
        .artifacts
        .range(hex.clone()..)
        .take_while(|(h, _)| h.starts_with(&hex))
        .take(MAX_ID_MATCHES + 1)
    {
        matches.push(IdMatch {
            what: "artifact".into(),
            id: hash.clone(),
            name: a.name.clone(),
        });
    }
    let more = matches.len() > MAX_ID_MATCHES;
    matches.truncate(MAX_ID_MATCHES);
    ok(json!(Resolved { matches, more }))
}

async fn lineage(hash: String, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let tree = p
        .lineage(&hash, &|id| {
            p.job(id).ok().flatten().map(|j| j.into_owned())
        })
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
    let (referenced, repairs): (Vec<(String, ArtifactKind, String)>, Value) = {
        let p = ctx.state.projection.read().await;
        let referenced = p
            .artifacts
            .values()
            .map(|a| (a.hash.clone(), a.artifact, a.name.clone()))
            .collect();
        (referenced, repairs(&p))
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
            let tree = artifact.is_directory().then(|| store.blobs.tree(hash).ok()).flatten();
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
        (json!({"chain": chain, "blobs": blobs, "artifacts_checked": referenced.len(), "repairs": repairs}), problems)
    })
    .await
    .map_err(internal)?;
    let problems: Vec<String> = problems
        .iter()
        .map(|p| ctx.state.without_server_paths(p))
        .collect();
    ok(json!(Verification {
        ok: problems.is_empty(),
        report,
        error: problems.join("; "),
        problems,
    }))
}

/// Every recorded loss (`herdd repair --accept-loss`), each with a line
/// for people: the record is intact again, but it is not whole, and says so.
fn repairs(p: &herd_core::Projection) -> Value {
    json!(p
        .repairs
        .iter()
        .map(|r| {
            let mut v = json!(r);
            v["message"] = json!(r.describe());
            v
        })
        .collect::<Vec<_>>())
}

async fn status(ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let count = |s: JobStatus| p.rows.values().filter(|j| j.status == s).count();
    ok(json!({
        "devices": ctx.scheduler.devices(),
        "head_seq": p.last_seq,
        "jobs": {"queued": count(JobStatus::Queued), "running": count(JobStatus::Running), "succeeded": count(JobStatus::Succeeded),
                  "failed": count(JobStatus::Failed), "cancelled": count(JobStatus::Cancelled),
                  "interrupted": count(JobStatus::Interrupted)},
        "repairs": repairs(&p),
        "executor": ctx.scheduler.executor_name(),
        "dashboard": ctx.dashboard_url.as_deref(),
    }))
}

/// A one-time login link for the dashboard (two minutes, one use).
async fn login_code(ctx: Ctx) -> Res {
    let Some(url) = ctx.dashboard_url.as_deref() else {
        return Err(conflict(
            "this herdd serves no dashboard (start it with --dashboard-listen ADDR)",
        ));
    };
    let code = ctx.sessions.new_code();
    created(json!({"code": code, "url": format!("{url}/login?code={code}")}))
}
