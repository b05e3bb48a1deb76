//! Rounds: a spec expanded into a job DAG, recorded, reproduced.

use super::jobs::{job_json, reproduce_one};
use super::*;

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
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
    ]
}

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
                .filter_map(|j| p.job(*j).ok().flatten().map(|v| (v.id, v.name.clone())))
                .collect();
            crate::rounds::final_policy_ref(&r.spec, &names)
        });
        (last.map(|r| r.index + 1).unwrap_or(0), previous)
    };
    let planned = {
        let p = ctx.state.projection.read().await;
        crate::rounds::expand(&spec_parsed, previous, &p)
            .map_err(|e| bad(format!("round spec: {e}")))?
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
            kind: j.kind,
            inputs: j.inputs,
            hyperparameters: j.hyperparameters,
            seed: j.seed,
            depends_on: j.depends_on,
            priority: j.priority,
            reproduces: None,
            resources: j.resources,
        };
        ctx.state
            .record_one(&streams::job(j.id), event)
            .await
            .map_err(internal)?;
    }
    created(json!(RoundSubmitted {
        id: round,
        index,
        jobs
    }))
}

async fn get_round(id: Uuid, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let r = p
        .rounds
        .get(&id)
        .ok_or_else(|| not_found(format!("no round {id}")))?;
    let mut jobs: Vec<Value> = vec![];
    for id in &r.jobs {
        if let Some(j) = p.job(*id).map_err(internal)? {
            jobs.push(job_json(&ctx, &j));
        }
    }
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
        pairs.push(Reproduction {
            original: j,
            reproduction: reproduce_one(&ctx, j).await?,
        });
    }
    created(json!(RoundReproduced {
        round: id,
        jobs: pairs
    }))
}
