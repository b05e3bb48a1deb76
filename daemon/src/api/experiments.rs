//! Experiments: create (names unique), list, show by id or name (with
//! their rounds).

use super::*;
use herd_core::model::ExperimentView;
use herd_core::wire::NewExperiment;
use herd_core::Projection;

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
        warp::path!("experiments" / String)
            .and(warp::get())
            .and(c.clone())
            .and_then(get_experiment)
            .boxed(),
    ]
}

async fn create_experiment(ctx: Ctx, body: NewExperiment) -> Res {
    let id = create(&ctx, body).await?;
    created(json!(Created { id }))
}

/// Record a new experiment under a unique name; its id.
pub(super) async fn create(ctx: &Ctx, body: NewExperiment) -> Result<Uuid, Rejection> {
    herd_core::vocab::check_name(&body.name).map_err(|e| bad(format!("field `name`: {e}")))?;
    if body.name.parse::<Uuid>().is_ok() || body.name.contains('/') {
        return Err(bad(format!(
            "field `name`: {:?} would read as an id or a path (EXPERIMENT/JOB); choose another",
            body.name
        )));
    }
    // Names are unique: people type them instead of ids. One creation at a
    // time, so two racing requests cannot both take a name.
    let _one = ctx.state.naming.lock().await;
    if let Some(e) = by_name(&ctx.state.projection.read().await.projection, &body.name).first() {
        return Err(conflict(format!(
            "an experiment named {:?} exists: {}",
            body.name, e.id
        )));
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
    Ok(id)
}

async fn list_experiments(ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    ok(json!(p.experiments.values().collect::<Vec<_>>()))
}

fn by_name<'a>(p: &'a Projection, name: &str) -> Vec<&'a ExperimentView> {
    p.experiments.values().filter(|e| e.name == name).collect()
}

/// An experiment by id, or by name.
async fn get_experiment(reference: String, ctx: Ctx) -> Res {
    let p = ctx.state.projection.read().await;
    let e = match reference.parse::<Uuid>() {
        Ok(id) => p.experiments.get(&id).ok_or_else(|| {
            not_found(format!(
                "no experiment {id}; `herd experiment list` shows them"
            ))
        })?,
        Err(_) => match by_name(&p.projection, &reference)[..] {
            [e] => e,
            [] => {
                return Err(not_found(format!(
                    "no experiment named {reference:?}; `herd experiment list` shows them"
                )))
            }
            // Names recorded before they had to be unique.
            ref several => {
                return Err(conflict(format!(
                    "{} experiments are named {reference:?}: {}; use an id",
                    several.len(),
                    several
                        .iter()
                        .map(|e| e.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        },
    };
    let rounds: Vec<_> = e.rounds.iter().filter_map(|r| p.rounds.get(r)).collect();
    ok(json!(ExperimentDetail {
        experiment: e.clone(),
        rounds: rounds.into_iter().cloned().collect()
    }))
}
