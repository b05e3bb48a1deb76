//! Commands that compare or follow jobs over time: `watch` (live bars),
//! `diff` (two jobs or rounds side by side) and `reproduce` (re-run and
//! compare fingerprints and outputs).

use super::*;

/// Follow one job, or every queued and running job, until they end; jobs
/// that end stay as final lines, and jobs submitted while watching show up
/// even when they ran between two looks. With `--json`, one JSON array per
/// poll.
pub(super) fn watch(c: &Client, id: Option<&str>, js: bool) -> Result<()> {
    let mut show = crate::progress::Follow::new();
    let since = crate::progress::now_ms();
    // Jobs seen so far: once one leaves the running list, its end is shown.
    let mut seen: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        let mut jobs: Vec<Job> = match id {
            Some(id) => vec![c.job(id)?],
            None => {
                let mut live = vec![];
                // Queued first: a job that starts between the two questions
                // is then running when the second is asked.
                for status in [JobStatus::Queued, JobStatus::Running] {
                    live.extend(c.jobs(&JobQuery {
                        status: Some(status),
                        ..Default::default()
                    })?);
                }
                // The latest submissions: a fast job may have come and gone.
                let recent = c.jobs(&JobQuery {
                    sort: Some("-submitted".into()),
                    limit: Some(50),
                    ..Default::default()
                })?;
                for j in recent {
                    if j.submitted_ms >= since && !live.iter().any(|l| l.id == j.id) {
                        live.push(j);
                    }
                }
                live
            }
        };
        for (gone, _) in seen.iter().filter(|(_, ended)| !**ended) {
            if !jobs.iter().any(|j| j.id.to_string() == *gone) {
                jobs.push(c.job(gone)?);
            }
        }
        if js {
            println!("{}", serde_json::to_string(&jobs).expect("json"));
        }
        if jobs.is_empty() && seen.is_empty() {
            eprintln!("nothing is queued or running (`herd history` lists what ran)");
            return Ok(());
        }
        for j in &jobs {
            if !js {
                show.update(j);
            }
            seen.insert(j.id.to_string(), j.is_final());
        }
        if jobs.iter().all(|j| j.is_final()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Only the rows that differ unless `all`: two jobs of one sweep share
/// dozens of hyperparameters, and the one that differs is the point.
pub(super) fn diff(c: &Client, a: &str, b: &str, all: bool, js: bool) -> Result<()> {
    // Rounds when both ids are rounds; jobs otherwise.
    let (ra, rb) = (c.round(a), c.round(b));
    let pairs: Vec<(Job, Job)> = match (ra, rb) {
        (Ok(ra), Ok(rb)) => {
            let (ja, jb) = (ra.jobs, rb.jobs);
            ja.into_iter()
                .filter_map(|x| {
                    jb.iter()
                        .find(|y| y.name == x.name)
                        .cloned()
                        .map(|y| (x, y))
                })
                .collect()
        }
        _ => vec![(c.job(a)?, c.job(b)?)],
    };
    let mut out = vec![];
    for (x, y) in &pairs {
        let mut rows = vec![];
        let hp = |j: &Job| {
            if j.effective_hyperparameters.is_null() {
                j.hyperparameters.clone()
            } else {
                j.effective_hyperparameters.clone()
            }
        };
        let (hx, hy) = (hp(x), hp(y));
        let keys: std::collections::BTreeSet<String> = hx
            .as_object()
            .into_iter()
            .flatten()
            .chain(hy.as_object().into_iter().flatten())
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            rows.push((
                "hp",
                k.clone(),
                hx.get(&k).cloned().unwrap_or(Value::Null),
                hy.get(&k).cloned().unwrap_or(Value::Null),
            ));
        }
        let inputs: std::collections::BTreeSet<&String> = x
            .resolved_inputs
            .keys()
            .chain(y.resolved_inputs.keys())
            .collect();
        for k in inputs {
            rows.push((
                "input",
                k.clone(),
                json!(x.resolved_inputs.get(k)),
                json!(y.resolved_inputs.get(k)),
            ));
        }
        rows.push(("seed", "seed".into(), json!(x.seed), json!(y.seed)));
        let metrics: std::collections::BTreeSet<&String> =
            x.last_metrics.keys().chain(y.last_metrics.keys()).collect();
        for k in metrics {
            rows.push(("metric", k.clone(), json!(x.metric(k)), json!(y.metric(k))));
        }
        let outs: std::collections::BTreeSet<&String> =
            x.outputs.keys().chain(y.outputs.keys()).collect();
        for k in outs {
            rows.push((
                "output",
                k.clone(),
                json!(x.outputs.get(k)),
                json!(y.outputs.get(k)),
            ));
        }
        out.push(JobDiff {
            a: x.id,
            b: y.id,
            a_name: x.name.clone(),
            b_name: y.name.clone(),
            rows: rows
                .into_iter()
                .map(|(section, key, a, b)| DiffRow {
                    same: super::render::same(&a, &b),
                    section,
                    key,
                    a,
                    b,
                })
                .collect(),
        });
    }
    print(js, &out, || {
        for d in &out {
            let (a, b) = (d.a.to_string(), d.b.to_string());
            let (a, b) = (
                format!("{} ({})", d.a_name, short(&a)),
                format!("{} ({})", d.b_name, short(&b)),
            );
            println!("== {a} vs {b}");
            println!("   {:<7} {:<22} {:<28} {}", "", "", a, b);
            let same = d.rows.iter().filter(|r| r.same).count();
            for r in d.rows.iter().filter(|r| all || !r.same) {
                let mark = if r.same { " " } else { "*" };
                println!(
                    " {mark} {:<7} {:<22} {:<28} {}",
                    r.section,
                    r.key,
                    short_val(&r.a),
                    short_val(&r.b)
                );
            }
            if same == d.rows.len() {
                println!("   (identical: {same} rows)");
            } else if !all && same > 0 {
                println!("   ({same} identical rows not shown; --all shows them)");
            }
        }
    });
    Ok(())
}

/// `herd diff`: one pair of jobs, row by row.
#[derive(serde::Serialize)]
struct JobDiff {
    a: uuid::Uuid,
    b: uuid::Uuid,
    a_name: String,
    b_name: String,
    rows: Vec<DiffRow>,
}

#[derive(serde::Serialize)]
struct DiffRow {
    section: &'static str,
    key: String,
    a: Value,
    b: Value,
    same: bool,
}

/// `herd reproduce`: one original job and its re-run.
#[derive(serde::Serialize)]
struct Reproduced {
    job: String,
    name: String,
    reproduction: String,
    status: JobStatus,
    identical: bool,
    outputs: BTreeMap<String, String>,
    reproduced_outputs: BTreeMap<String, String>,
    metric_differences: BTreeMap<String, f64>,
    same_environment: bool,
    environment_differences: BTreeMap<String, Value>,
}

pub(super) fn reproduce(c: &Client, id: &str, timeout: u64, js: bool) -> Result<()> {
    let pairs: Vec<(String, String)> = match c.round(id) {
        Ok(_) => {
            let v = c.reproduce_round(id)?;
            v.jobs
                .iter()
                .map(|p| (p.original.to_string(), p.reproduction.to_string()))
                .collect()
        }
        Err(ClientError::Api { status: 404, .. }) => {
            let v = c.reproduce_job(id)?;
            vec![(id.to_string(), v.id.to_string())]
        }
        Err(e) => return Err(e),
    };
    let mut report = vec![];
    let mut all_same = true;
    for (orig, new) in &pairs {
        let a = c.job(orig)?;
        let b = c.wait(new, Duration::from_secs(timeout))?;
        let same = b.status == JobStatus::Succeeded && a.outputs == b.outputs;
        all_same &= same;
        // The environment first: a difference there explains different bytes.
        let keys: std::collections::BTreeSet<&String> =
            a.fingerprint.keys().chain(b.fingerprint.keys()).collect();
        let environment: BTreeMap<String, Value> = keys
            .into_iter()
            .filter(|k| a.fingerprint.get(*k) != b.fingerprint.get(*k))
            .map(|k| {
                (
                    (*k).clone(),
                    json!({"original": a.fingerprint.get(k), "reproduction": b.fingerprint.get(k)}),
                )
            })
            .collect();
        let diffs: BTreeMap<String, f64> = a
            .last_metrics
            .iter()
            .filter_map(|(k, (_, v))| b.metric(k).map(|w| (k.clone(), w - v)))
            .filter(|(_, d)| *d != 0.0)
            .collect();
        report.push(Reproduced {
            job: orig.clone(),
            name: a.name.clone(),
            reproduction: new.clone(),
            status: b.status,
            identical: same,
            outputs: a.outputs.clone(),
            reproduced_outputs: b.outputs.clone(),
            metric_differences: if same { BTreeMap::new() } else { diffs },
            same_environment: environment.is_empty(),
            environment_differences: environment,
        });
    }
    print(js, &json!({"identical": all_same, "jobs": report}), || {
        for r in &report {
            println!(
                "{:<14} {:<10} {}",
                short(&r.name),
                if r.identical {
                    "identical"
                } else {
                    "DIFFERENT"
                },
                r.reproduction
            );
            if r.same_environment {
                println!("    environment: same build, kernels, threads and device");
            } else {
                println!(
                    "    environment DIFFERED: {}",
                    json!(r.environment_differences)
                );
            }
            if !r.identical {
                println!("    metric differences: {}", json!(r.metric_differences));
                if r.same_environment {
                    println!("    same environment, different outputs: the job is not deterministic here");
                } else {
                    println!(
                        "    the environment differed, which can explain the different outputs"
                    );
                }
            }
        }
        println!(
            "{}",
            if all_same {
                "all output hashes identical"
            } else {
                "some outputs differ"
            }
        );
    });
    if all_same {
        Ok(())
    } else {
        Err(ClientError::Api {
            status: 0,
            message: "reproduction produced different outputs".into(),
        })
    }
}
