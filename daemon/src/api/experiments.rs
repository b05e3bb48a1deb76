//! Experiments: create, list, show (with their rounds).

use super::*;

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
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
    ]
}

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
    created(json!(Created { id }))
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
    ok(json!(ExperimentDetail {
        experiment: e.clone(),
        rounds: rounds.into_iter().cloned().collect()
    }))
}
