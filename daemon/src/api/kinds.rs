//! Job kinds: what each takes (inputs and the artifact kinds they accept),
//! makes (outputs) and its hyperparameters with defaults, from the recipe
//! registry itself, so this answer cannot drift from what is checked.

use super::*;
use crate::jobs::{describe, RECIPES};

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![
        warp::path!("kinds")
            .and(warp::get())
            .and(c.clone())
            .and_then(list_kinds)
            .boxed(),
        warp::path!("kinds" / String)
            .and(warp::get())
            .and(c)
            .and_then(get_kind)
            .boxed(),
    ]
}

async fn list_kinds(_ctx: Ctx) -> Res {
    let all: Vec<_> = RECIPES.iter().map(|r| describe(*r)).collect();
    reply_json(&all)
}

async fn get_kind(kind: String, _ctx: Ctx) -> Res {
    let kind: JobKind = kind.parse().map_err(bad)?;
    let r = crate::jobs::recipe(kind).map_err(bad)?;
    reply_json(&describe(r))
}
