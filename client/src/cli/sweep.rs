//! `herd sweep`: a grid of one kind of job submitted as one round, so it is
//! recorded, shown and reproduced like any round; optionally an `average`
//! of the best K outputs by a metric (Llama 3 averages models from runs with
//! different hyperparameters). The grid runs in parallel on whichever
//! executor the daemon has; the average's choice is made when its inputs
//! have ended (the scheduler ranks them) and recorded as its inputs.

use super::*;

/// What `herd sweep` takes on its command line.
#[derive(clap::Args)]
pub struct Sweep {
    /// The kind of every point (`herd kinds` lists them)
    #[arg(long)]
    pub kind: JobKind,
    /// Experiment id or name (the sweep is one of its rounds)
    #[arg(long)]
    pub experiment: String,
    /// name=HASH (or name=job:ID/output), the same for every point
    #[arg(long = "input", value_parser = parse_kv)]
    pub inputs: Vec<(String, String)>,
    /// key=value, the same for every point
    #[arg(long = "set", value_parser = parse_kv)]
    pub sets: Vec<(String, String)>,
    /// key=v1,v2,...: one axis of the grid (repeat for more axes)
    #[arg(long = "grid", value_parser = parse_kv)]
    pub grid: Vec<(String, String)>,
    /// Every point's seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Average the best K outputs (an `average` job in the round)
    #[arg(long)]
    pub average_top: Option<usize>,
    /// metric.NAME that ranks the points (its last value)
    #[arg(long)]
    pub by: Option<String>,
    /// min or max [default: min for losses and perplexities, else max]
    #[arg(long)]
    pub order: Option<String>,
    /// What each job asks of a cluster executor (see submit)
    #[arg(long)]
    pub resources: Option<herd_core::Resources>,
    /// Wait for the round to end
    #[arg(long)]
    pub wait: bool,
}

/// `herd sweep`: plan the grid, say what was planned, submit it as a round.
pub(super) fn run(c: &Client, args: &Sweep, js: bool, quiet: bool) -> Result<()> {
    let Sweep {
        kind,
        experiment,
        inputs,
        sets,
        grid,
        seed,
        average_top,
        by,
        order,
        resources,
        wait,
    } = args;
    let inputs = &resolve::inputs(c, inputs)?;
    let (spec, said) = sweep::plan(&sweep::SweepArgs {
        kind: *kind,
        inputs,
        sets,
        grid,
        seed: *seed,
        experiment: resolve::experiment(c, experiment)?,
        average_top: *average_top,
        by: by.as_deref(),
        order: order.as_deref(),
        resources: resources.unwrap_or_default(),
        makes_models: average_top.is_some() && {
            let model = |a: &Option<ArtifactKind>| {
                matches!(a, Some(ArtifactKind::Checkpoint | ArtifactKind::Adapter))
            };
            c.kinds()?
                .iter()
                .any(|k| k.kind == *kind && k.outputs.iter().any(|o| model(&o.artifact)))
        },
    })?;
    // On stderr: stdout stays the round (or its id, or JSON).
    if !quiet {
        for line in &said {
            eprintln!("  {line}");
        }
    }
    let spec: crate::RoundSpec = serde_json::from_value(spec)
        .map_err(|e| ClientError::Decode(format!("the sweep's round spec: {e}")))?;
    experiments::submit_round(c, &spec, *wait, js, quiet)?;
    Ok(())
}

/// What `herd sweep` was asked, resolved.
pub(super) struct SweepArgs<'a> {
    pub kind: JobKind,
    pub inputs: &'a [(String, InputRef)],
    pub sets: &'a [(String, String)],
    pub grid: &'a [(String, String)],
    pub seed: u64,
    pub experiment: uuid::Uuid,
    pub average_top: Option<usize>,
    pub by: Option<&'a str>,
    pub order: Option<&'a str>,
    pub resources: herd_core::Resources,
    /// Whether `kind` makes a model (a checkpoint or an adapter), as the
    /// daemon's registry says (`GET /kinds`): only then can `--average-top`
    /// average its outputs.
    pub makes_models: bool,
}

/// A value as typed: JSON when it parses (numbers, booleans), else text.
fn value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::String(text.to_string()))
}

/// Every point of the grid, the last `--grid` varying fastest: each value
/// as typed (it names the point) with its key.
fn points(grid: &[(String, String)]) -> Result<Vec<Vec<(String, String)>>> {
    let mut out: Vec<Vec<(String, String)>> = vec![vec![]];
    let mut seen = std::collections::BTreeSet::new();
    for (key, values) in grid {
        if !seen.insert(key.clone()) {
            return Err(ClientError::Usage(format!(
                "--grid {key}: given twice; list every value once: --grid {key}=a,b,c"
            )));
        }
        let values: Vec<&str> = values.split(',').map(str::trim).collect();
        if values.iter().any(|v| v.is_empty()) {
            return Err(ClientError::Usage(format!(
                "--grid {key}={}: an empty value",
                values.join(",")
            )));
        }
        if let Some(v) = values
            .iter()
            .find(|v| values.iter().filter(|w| w == v).count() > 1)
        {
            return Err(ClientError::Usage(format!(
                "--grid {key}={}: {v} is listed twice",
                values.join(",")
            )));
        }
        out = out
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut p = p.clone();
                    p.push((key.clone(), v.to_string()));
                    p
                })
            })
            .collect();
    }
    Ok(out)
}

/// The round spec of a sweep, and what each job is (for the person).
pub(super) fn plan(a: &SweepArgs) -> Result<(Value, Vec<String>)> {
    if a.grid.is_empty() {
        return Err(ClientError::Usage(
            "a sweep needs at least one --grid KEY=V1,V2".into(),
        ));
    }
    let points = points(a.grid)?;
    if points.len() > 256 {
        return Err(ClientError::Usage(format!(
            "the grid has {} points; at most 256 in one sweep",
            points.len()
        )));
    }
    let mut fixed = serde_json::Map::new();
    for (k, v) in a.sets {
        if a.grid.iter().any(|(g, _)| g == k) {
            return Err(ClientError::Usage(format!("{k} is both --set and --grid")));
        }
        fixed.insert(k.clone(), value(v));
    }
    // Inputs travel as round variables: a hash or a job:ID/output both work.
    let vars: BTreeMap<String, String> = a
        .inputs
        .iter()
        .map(|(n, r)| (format!("in_{n}"), r.to_string()))
        .collect();
    let inputs: BTreeMap<String, String> = a
        .inputs
        .iter()
        .map(|(n, _)| (n.clone(), format!("$in_{n}")))
        .collect();
    let mut jobs = vec![];
    let mut said = vec![];
    for p in &points {
        // Named by its values as typed (`sft_lr3e-4_beta0.2`), so a
        // history, a plot's legend and the average's ranking say which
        // point is which.
        let name = std::iter::once(a.kind.to_string())
            .chain(p.iter().map(|(k, v)| format!("{k}{v}")))
            .collect::<Vec<_>>()
            .join("_");
        herd_core::vocab::check_name(&name)
            .map_err(|e| ClientError::Usage(format!("the grid point named {name:?}: {e}")))?;
        let mut hp = fixed.clone();
        for (k, v) in p {
            hp.insert(k.clone(), value(v));
        }
        said.push(format!(
            "{name}: {}",
            p.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let mut job = json!({"name": name, "kind": a.kind, "inputs": inputs,
                             "hyperparameters": hp, "seed": a.seed});
        if !a.resources.is_empty() {
            job["resources"] = json!(a.resources);
        }
        jobs.push(job);
    }
    let mut spec = json!({"experiment": a.experiment, "seed": a.seed, "vars": vars});
    match (a.average_top, a.by) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(ClientError::Usage(
                "--average-top K and --by metric.NAME go together".into(),
            ))
        }
        (Some(k), Some(by)) => {
            if !a.makes_models {
                return Err(ClientError::Usage(format!(
                    "--average-top averages models, and {} jobs make none (`herd kinds` shows what each kind makes)",
                    a.kind
                )));
            }
            let metric = by.strip_prefix("metric.").ok_or_else(|| {
                ClientError::Usage(format!("--by {by}: metric.NAME (e.g. metric.loss)"))
            })?;
            if k == 0 || k > points.len() {
                return Err(ClientError::Usage(format!(
                    "--average-top {k}: between 1 and the {} points of the grid",
                    points.len()
                )));
            }
            // Losses rank lowest first; anything else (rewards, accuracy)
            // highest first, unless --order says.
            let order = match a.order {
                Some(o @ ("min" | "max")) => o,
                Some(o) => return Err(ClientError::Usage(format!("--order {o}: min or max"))),
                None if metric.contains("loss") || metric.contains("perplexity") => "min",
                None => "max",
            };
            // With LoRA a training job makes an adapter, else a checkpoint.
            let lora = |hp: &Value| hp.get("lora_rank").and_then(Value::as_u64).unwrap_or(0) > 0;
            let outputs: std::collections::BTreeSet<&str> = jobs
                .iter()
                .map(|j| {
                    if lora(&j["hyperparameters"]) {
                        "adapter"
                    } else {
                        "checkpoint"
                    }
                })
                .collect();
            if outputs.len() > 1 {
                return Err(ClientError::Usage(
                    "--average-top: the grid mixes full fine-tuning and LoRA (lora_rank 0 and > 0); their outputs cannot be averaged together".into(),
                ));
            }
            let output = outputs.into_iter().next().expect("a point");
            let avg_inputs: BTreeMap<String, String> = jobs
                .iter()
                .map(|j| {
                    let n = j["name"].as_str().expect("named").to_string();
                    (n.clone(), format!("{n}.{output}"))
                })
                .collect();
            jobs.push(
                json!({"name": "average", "kind": "average", "inputs": avg_inputs,
                             "hyperparameters": {"top_k": k, "by": by, "order": order}}),
            );
            said.push(format!(
                "average: the top {k} by {by} ({}) when they have ended",
                if order == "min" {
                    "lowest first"
                } else {
                    "highest first"
                }
            ));
            spec["final_policy"] = json!(format!("average.{output}"));
        }
    }
    spec["jobs"] = Value::Array(jobs);
    Ok((spec, said))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_becomes_one_round_with_an_average_of_the_best() {
        let grid = vec![
            ("lr".to_string(), "1e-5,2e-5".to_string()),
            ("beta".to_string(), "0.1,0.2".to_string()),
        ];
        let h = "ab".repeat(32);
        let inputs = vec![("model".to_string(), h.parse().unwrap())];
        let sets = vec![("steps".to_string(), "3".to_string())];
        let a = SweepArgs {
            kind: JobKind::Dpo,
            inputs: &inputs,
            sets: &sets,
            grid: &grid,
            seed: 7,
            experiment: uuid::Uuid::nil(),
            average_top: Some(2),
            by: Some("metric.loss"),
            order: None,
            resources: "cpus=1".parse().unwrap(),
            makes_models: true,
        };
        let (spec, said) = plan(&a).unwrap();
        let jobs = spec["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 5);
        assert_eq!(
            jobs[1]["hyperparameters"],
            json!({"steps": 3, "lr": 1e-5, "beta": 0.2})
        );
        assert_eq!(jobs[2]["hyperparameters"]["lr"], json!(2e-5));
        assert_eq!(jobs[0]["inputs"]["model"], "$in_model");
        assert_eq!(spec["vars"]["in_model"], json!(h));
        assert_eq!(jobs[3]["resources"], "cpus=1");
        assert_eq!(
            jobs[4]["hyperparameters"],
            json!({"top_k": 2, "by": "metric.loss", "order": "min"})
        );
        let names: Vec<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "dpo_lr1e-5_beta0.1",
                "dpo_lr1e-5_beta0.2",
                "dpo_lr2e-5_beta0.1",
                "dpo_lr2e-5_beta0.2",
                "average"
            ]
        );
        assert_eq!(
            jobs[4]["inputs"]["dpo_lr2e-5_beta0.2"],
            "dpo_lr2e-5_beta0.2.checkpoint"
        );
        assert!(said[0].starts_with("dpo_lr1e-5_beta0.1: lr=1e-5 beta=0.1"));
        assert_eq!(spec["final_policy"], "average.checkpoint");
        assert_eq!(said.len(), 5);
        let reward = SweepArgs {
            by: Some("metric.reward"),
            ..a
        };
        assert_eq!(
            plan(&reward).unwrap().0["jobs"][4]["hyperparameters"]["order"],
            "max"
        );
        for bad in [
            SweepArgs {
                average_top: Some(5),
                ..reward
            },
            SweepArgs { by: None, ..reward },
            SweepArgs {
                kind: JobKind::Sample,
                makes_models: false,
                ..reward
            },
            SweepArgs {
                grid: &[],
                ..reward
            },
            SweepArgs {
                grid: &[("lr".to_string(), "1e-5,1e-5".to_string())],
                ..reward
            },
        ] {
            assert!(plan(&bad).is_err());
        }
    }
}
