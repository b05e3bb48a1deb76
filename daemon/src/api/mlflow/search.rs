//! `runs/search`: MLflow's basic filter (`metrics.loss < 2 and
//! params.lr = '1e-4'`) over every recorded job, newest first.

use super::*;

#[derive(Deserialize)]
pub(super) struct SearchRuns {
    #[serde(default)]
    experiment_ids: Vec<String>,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    max_results: Option<usize>,
}

/// One clause of a search filter: `metrics.loss < 2`, `params.lr = '1e-4'`,
/// `tags.x = 'y'`, `attributes.status = 'FINISHED'`.
struct Clause {
    scope: String,
    key: String,
    op: String,
    value: String,
}

fn parse_filter(filter: &str) -> Result<Vec<Clause>, Failure> {
    let mut out = vec![];
    let lower = filter.to_ascii_lowercase();
    let mut parts = vec![];
    let mut start = 0;
    while let Some(i) = lower[start..].find(" and ") {
        parts.push(&filter[start..start + i]);
        start += i + 5;
    }
    parts.push(&filter[start..]);
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let op = ["!=", ">=", "<=", "=", "<", ">"]
            .into_iter()
            .find(|op| part.contains(op))
            .ok_or_else(|| invalid(format!("filter clause {part:?}: no comparison")))?;
        let (lhs, rhs) = part.split_once(op).expect("found");
        let (scope, key) = lhs.trim().split_once('.').ok_or_else(|| {
            invalid(format!(
                "filter clause {part:?}: metrics.X, params.X, tags.X or attributes.X"
            ))
        })?;
        let scope = match scope {
            "metrics" | "metric" => "metrics",
            "params" | "param" | "parameters" => "params",
            "tags" | "tag" => "tags",
            "attributes" | "attribute" | "attr" | "run" => "attributes",
            other => {
                return Err(invalid(format!(
                    "filter clause {part:?}: unknown scope {other:?}"
                )))
            }
        };
        let value = rhs
            .trim()
            .trim_matches(|c| c == '\'' || c == '"')
            .to_string();
        out.push(Clause {
            scope: scope.into(),
            key: key.trim().trim_matches('`').to_string(),
            op: op.into(),
            value,
        });
    }
    Ok(out)
}

fn compare<T: PartialOrd>(a: T, op: &str, b: T) -> bool {
    match op {
        "=" => a == b,
        "!=" => a != b,
        "<" => a < b,
        "<=" => a <= b,
        ">" => a > b,
        _ => a >= b,
    }
}

fn matches(j: &JobView, clauses: &[Clause]) -> bool {
    clauses.iter().all(|c| {
        let text: Option<String> = match c.scope.as_str() {
            "metrics" => j.last_metrics.get(&c.key).map(|(_, v)| v.to_string()),
            "params" => j
                .effective_hyperparameters
                .get(&c.key)
                .or_else(|| j.hyperparameters.get(&c.key))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            "tags" => j.tags.get(&c.key).cloned(),
            _ => match c.key.as_str() {
                "status" => Some(mlflow_status(j.status).to_string()),
                "run_id" => Some(j.id.to_string()),
                "run_name" => Some(j.name.clone()),
                _ => None,
            },
        };
        let Some(text) = text else {
            return false;
        };
        match (text.parse::<f64>(), c.value.parse::<f64>()) {
            (Ok(a), Ok(b)) => compare(a, &c.op, b),
            _ => compare(text.as_str(), &c.op, c.value.as_str()),
        }
    })
}

pub(super) async fn search_runs(ctx: &Ctx, body: SearchRuns) -> Answer {
    let clauses = parse_filter(&body.filter)?;
    let max = body.max_results.unwrap_or(1000).min(50_000);
    let experiments: Vec<Option<Uuid>> = body
        .experiment_ids
        .iter()
        .map(|e| experiment_of(e))
        .collect::<Result<_, _>>()?;
    let p = ctx.state.projection.read().await;
    let mut runs = vec![];
    // Newest first, as MLflow orders by start time.
    for (id, row) in p.rows.iter().rev() {
        if !experiments.is_empty() && !experiments.contains(&row.experiment) {
            continue;
        }
        let Some(j) = p.job(*id).map_err(|e| from_rejection(internal(e)))? else {
            continue;
        };
        if matches(&j, &clauses) {
            runs.push(run_json(&j));
            if runs.len() >= max {
                break;
            }
        }
    }
    Ok(json!({"runs": runs}))
}
