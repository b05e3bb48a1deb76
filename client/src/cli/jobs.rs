//! Commands about jobs: show one, history as a table, plot curves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{json, Value};

use std::time::Duration;

use super::render::{duration, job_row, num, print, short, time_of};
use super::{parse_kv, repairs_note, resolve};
use crate::{Client, ClientError, Job, JobKind, JobQuery, JobRequest, JobStatus, Result};

/// The hyperparameters a job ran with (effective where recorded).
pub(super) fn hyperparameters(j: &Job) -> &Value {
    if j.effective_hyperparameters.is_null() {
        &j.hyperparameters
    } else {
        &j.effective_hyperparameters
    }
}

pub(super) fn show(c: &Client, id: &str, js: bool) -> Result<()> {
    let j = c.job(id)?;
    print(js, &json!(j), || {
        println!(
            "{} {} ({}) — {}",
            j.kind,
            herd_core::vocab::printable(&j.name),
            j.id,
            j.status
        );
        if let Some(e) = &j.error {
            println!("  error: {e}");
        }
        let mut when = format!("  submitted {}", time_of(j.submitted_ms));
        if let (Some(s), f) = (j.started_ms, j.finished_ms) {
            when += &format!(", started {}", time_of(s));
            if let Some(f) = f {
                when += &format!(", took {}", duration(f.saturating_sub(s)));
            }
        }
        println!("{when}");
        println!(
            "  seed {}  attempts {}  device {}",
            j.seed,
            j.attempts,
            j.device.clone().unwrap_or_default()
        );
        if let Some(h) = &j.executor {
            println!("  ran as {} job {}", h.executor, h.id);
        }
        if !j.resources.is_empty() {
            println!("  resources {}", j.resources);
        }
        println!("  inputs:");
        let started = !j.resolved_inputs.is_empty();
        for (k, v) in &j.inputs {
            match j.resolved_inputs.get(k) {
                Some(h) => println!("    {k} = {h}"),
                // An average with top_k leaves the rest out when it starts.
                None if started => println!("    {k} = {v} (not kept)"),
                None => println!("    {k} = {v}"),
            }
        }
        println!("  hyperparameters:");
        for (k, v) in hyperparameters(&j).as_object().into_iter().flatten() {
            println!("    {k:<20} {}", cell(v));
        }
        println!("  outputs:");
        for (k, v) in &j.outputs {
            println!("    {k} = {v}");
        }
        println!("  last metrics:");
        for (k, (s, v)) in &j.last_metrics {
            println!("    {k:<20} {:<14} (step {s})", num(*v));
        }
    });
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Number(n) => n.as_f64().map_or(n.to_string(), num),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Metrics worth a column by default, when a job has them.
pub(super) const KEY_METRICS: [&str; 6] = [
    "loss",
    "accuracy",
    "reward_accuracy",
    "task_accuracy",
    "win_rate",
    "heldout_accuracy",
];

/// The default columns: identity, time, the hyperparameters that differ
/// among these jobs, key metrics, outputs. A hyperparameter differs when
/// at least two jobs have it with different values: one a kind lacks
/// (`beta` beside an SFT job) is not a difference.
fn default_columns(jobs: &[Job]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let head: Vec<String> = ["job", "kind", "status", "name", "started", "duration"]
        .map(String::from)
        .to_vec();
    let mut values: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for j in jobs {
        for (k, v) in hyperparameters(j).as_object().into_iter().flatten() {
            values.entry(k.as_str()).or_default().insert(cell(v));
        }
    }
    let hps = values
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| format!("hp.{k}"))
        .collect();
    let mut tail: Vec<String> = KEY_METRICS
        .iter()
        .filter(|m| jobs.iter().any(|j| j.last_metrics.contains_key(**m)))
        .map(|m| format!("metric.{m}"))
        .collect();
    tail.push("outputs".into());
    (head, hps, tail)
}

/// The terminal's width, when stdout is one.
fn terminal_width() -> Option<usize> {
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ fills a winsize struct we own.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0
            && ws.ws_col > 0
        {
            return Some(ws.ws_col as usize);
        }
    }
    None
}

/// A `--columns` key no job has: an error, with the nearest key jobs have.
fn unknown_column(jobs: &[Job], col: &str) -> Option<String> {
    let (prefix, name) = col.split_once('.')?;
    let keys: BTreeSet<String> = match prefix {
        "hp" => jobs
            .iter()
            .flat_map(|j| {
                hyperparameters(j)
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone())
            })
            .collect(),
        "metric" => jobs
            .iter()
            .flat_map(|j| j.last_metrics.keys().cloned())
            .collect(),
        _ => return None,
    };
    if jobs.is_empty() || keys.contains(name) {
        return None;
    }
    let near = herd_core::vocab::nearest(name, keys.iter().map(String::as_str));
    Some(match near {
        Some(k) => format!("--columns: no job here has `{col}`; did you mean `{prefix}.{k}`?"),
        None => format!(
            "--columns: no job here has `{col}` ({prefix} names: {})",
            keys.into_iter().collect::<Vec<_>>().join(", ")
        ),
    })
}

fn column(j: &Job, col: &str) -> String {
    match col {
        "job" | "id" => j.id.to_string(),
        "kind" => j.kind.to_string(),
        "status" => j.status.to_string(),
        "name" => herd_core::vocab::printable(&j.name).into_owned(),
        "seed" => j.seed.to_string(),
        "submitted" => time_of(j.submitted_ms),
        "started" => j.started_ms.map_or("-".into(), time_of),
        "finished" => j.finished_ms.map_or("-".into(), time_of),
        "duration" => match (j.started_ms, j.finished_ms) {
            (Some(s), Some(f)) => duration(f.saturating_sub(s)),
            (Some(_), None) => "running".into(),
            _ => "-".into(),
        },
        "outputs" => j.outputs.keys().cloned().collect::<Vec<_>>().join(","),
        "experiment" => j.experiment.map_or("-".into(), |e| short(&e.to_string())),
        "attempts" => j.attempts.to_string(),
        other => {
            if let Some(k) = other.strip_prefix("hp.") {
                hyperparameters(j).get(k).map_or("-".into(), cell)
            } else if let Some(m) = other.strip_prefix("metric.") {
                j.last_metrics.get(m).map_or("-".into(), |v| num(v.1))
            } else {
                "?".into()
            }
        }
    }
}

const KNOWN: &str = "job, kind, status, name, seed, submitted, started, finished, duration, outputs, experiment, attempts, hp.NAME, metric.NAME";

pub(super) fn history_table(jobs: &[Job], columns: Option<&str>) -> Result<()> {
    let mut left_out = vec![];
    let cols: Vec<String> = match columns {
        Some(list) => {
            let cols: Vec<String> = list.split(',').map(|c| c.trim().to_string()).collect();
            for c in &cols {
                let plain = KNOWN.split(", ").any(|k| k == c);
                if !(plain || c.starts_with("hp.") || c.starts_with("metric.")) {
                    return Err(ClientError::Usage(format!(
                        "--columns: no column {c:?} (columns: {KNOWN})"
                    )));
                }
                if let Some(e) = unknown_column(jobs, c) {
                    return Err(ClientError::Usage(e));
                }
            }
            cols
        }
        None => {
            let (head, mut hps, tail) = default_columns(jobs);
            // On a terminal, the table fits its width: hyperparameter
            // columns go from the right and are named in a footer.
            if let Some(width) = terminal_width() {
                let w = |c: &str| {
                    jobs.iter()
                        .map(|j| column(j, c).chars().count())
                        .chain([c.chars().count()])
                        .max()
                        .unwrap_or(0)
                        + 2
                };
                let fixed: usize = head.iter().chain(&tail).map(|c| w(c)).sum();
                let mut total = fixed + hps.iter().map(|c| w(c)).sum::<usize>();
                while total > width && !hps.is_empty() {
                    let c = hps.pop().expect("not empty");
                    total -= w(&c);
                    left_out.insert(0, c);
                }
            }
            head.into_iter().chain(hps).chain(tail).collect()
        }
    };
    let cells: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| cols.iter().map(|c| column(j, c)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &[String]| {
        row.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&cols));
    for r in &cells {
        println!("{}", line(r));
    }
    if !left_out.is_empty() {
        println!(
            "({} more hyperparameter(s) differ: {}; show them with --columns)",
            left_out.len(),
            left_out.join(", ")
        );
    }
    Ok(())
}

/// Points per curve a plot asks for: more than a panel's pixel width.
const PLOT_POINTS: usize = 2000;

/// Plot the metrics of one or more jobs: sparklines on the terminal, and
/// with `out` an SVG or PNG with one panel per metric and a line per job.
pub(super) fn plot(
    c: &Client,
    ids: &[String],
    metrics: &[String],
    out: Option<&PathBuf>,
    js: bool,
) -> Result<()> {
    use crate::plot::{Curve, Panel};
    let names: Vec<&str> = metrics.iter().map(|s| s.as_str()).collect();
    let mut jobs = vec![];
    for id in ids {
        let j = c.job(id)?;
        // A picture needs no more points than it has pixels (each bucket's
        // extremes are kept, so no spike is lost); `--json` gets them all.
        let series = if js {
            c.metrics(id, &names)?
        } else {
            c.sampled_metrics(id, &names, PLOT_POINTS, None, None)?
                .series
        };
        if series.is_empty() {
            return Err(ClientError::Usage(format!(
                "job {} ({}) has no metrics{}",
                j.name,
                j.id,
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" named {}", names.join(", "))
                }
            )));
        }
        jobs.push((j, series));
    }
    // A label per job: its name, with its id's start where names repeat.
    let label = |j: &Job| {
        if jobs.iter().filter(|(o, _)| o.name == j.name).count() > 1 {
            format!("{} ({})", j.name, short(&j.id.to_string()))
        } else {
            j.name.clone()
        }
    };
    let metric_names: BTreeSet<String> = if names.is_empty() {
        jobs.iter().flat_map(|(_, s)| s.keys().cloned()).collect()
    } else {
        names.iter().map(|n| n.to_string()).collect()
    };
    let labels: Vec<String> = jobs.iter().map(|(j, _)| label(j)).collect();
    let panels: Vec<Panel> = metric_names
        .iter()
        .map(|m| Panel {
            metric: m.clone(),
            curves: jobs
                .iter()
                .enumerate()
                .filter_map(|(i, (_, s))| {
                    s.get(m).map(|pts| Curve {
                        job: i,
                        points: pts.clone(),
                    })
                })
                .collect(),
        })
        .collect();
    let title = format!(
        "{}: {}",
        metric_names.iter().cloned().collect::<Vec<_>>().join(", "),
        jobs.iter()
            .map(|(j, _)| label(j))
            .collect::<Vec<_>>()
            .join(" vs ")
    );
    if let Some(path) = out {
        crate::plot::draw(path, &title, &labels, &panels).map_err(ClientError::Usage)?;
    }
    let summary = json!({
        "file": out,
        "metrics": metric_names,
        "jobs": jobs.iter().map(|(j, _)| j.id).collect::<Vec<_>>(),
    });
    print(js, &summary, || {
        for p in &panels {
            for c in &p.curves {
                let vals: Vec<f64> = c.points.iter().map(|p| p.1).collect();
                println!(
                    "{:<14} {:<18} {} last={}",
                    p.metric,
                    labels[c.job].chars().take(18).collect::<String>(),
                    crate::plot::sparkline(&vals, 50),
                    vals.last().copied().map_or("-".into(), num)
                );
            }
        }
        match out {
            Some(path) => println!("wrote {}", path.display()),
            None => println!("(--out FILE.svg or FILE.png draws one panel per metric)"),
        }
    });
    Ok(())
}

/// What `herd submit` takes.
#[derive(clap::Args)]
pub struct Submit {
    /// The job's kind (`herd kinds` lists them with their inputs)
    #[arg(long)]
    pub kind: JobKind,
    /// name=HASH (or name=job:ID/output)
    #[arg(long = "input", value_parser = parse_kv)]
    pub inputs: Vec<(String, String)>,
    /// key=value hyperparameter (value parsed as JSON when it can be)
    #[arg(long = "set", value_parser = parse_kv)]
    pub sets: Vec<(String, String)>,
    /// The job's seed: the same seed, inputs and hyperparameters give the
    /// same outputs (bit-identical on CPU)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Experiment id or name (the job is recorded under it)
    #[arg(long)]
    pub experiment: Option<String>,
    /// A name for the job (default: its kind): EXPERIMENT/NAME then names
    /// it where no other job in the experiment has that name
    #[arg(long)]
    pub name: Option<String>,
    /// Higher runs first among queued jobs whose inputs are ready
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Jobs this one waits for (id or EXPERIMENT/NAME)
    #[arg(long)]
    pub after: Vec<String>,
    /// What the job asks of a cluster executor, over the daemon's
    /// defaults: cpus=4,gpus=1,mem=16G,time=2:00:00 (Slurm only)
    #[arg(long)]
    pub resources: Option<herd_core::Resources>,
    /// Wait for the job to end
    #[arg(long)]
    pub wait: bool,
}

/// `herd submit`: one job, optionally waited for.
pub(super) fn submit(c: &Client, args: &Submit, js: bool, quiet: bool) -> Result<()> {
    let Submit {
        kind,
        inputs,
        sets,
        seed,
        experiment,
        name,
        priority,
        after,
        resources,
        wait,
    } = args;
    let mut hp = serde_json::Map::new();
    for (k, v) in sets {
        hp.insert(
            k.clone(),
            serde_json::from_str(v).unwrap_or(Value::String(v.clone())),
        );
    }
    let req = JobRequest {
        kind: *kind,
        inputs: resolve::inputs(c, inputs)?
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        hyperparameters: Value::Object(hp),
        seed: *seed,
        experiment: experiment
            .as_deref()
            .map(|e| resolve::experiment(c, e))
            .transpose()?,
        name: name.clone(),
        priority: *priority,
        depends_on: after
            .iter()
            .map(|a| resolve::job(c, a))
            .collect::<Result<_>>()?,
        resources: resources.unwrap_or_default(),
    };
    let v = c.submit(&req)?;
    let id = v.id.to_string();
    if *wait {
        if quiet {
            println!("{id}");
        }
        let mut show = crate::progress::Follow::new();
        let j =
            crate::progress::wait_all(c, &[id.clone()], Duration::from_secs(24 * 3600), &mut show)?
                .remove(0);
        if !quiet {
            print(js, &json!(j), || println!("{}", job_row(&j)));
        }
        if j.status != JobStatus::Succeeded {
            return Err(ClientError::Api {
                status: 0,
                message: format!(
                    "job {id} {}: {}",
                    j.status,
                    j.error.as_deref().unwrap_or("no reason recorded")
                ),
            });
        }
    } else {
        print(js, &json!(v), || println!("{id}"));
    }
    Ok(())
}

/// What `herd history` takes.
#[derive(clap::Args)]
pub struct History {
    /// Experiment id or name
    #[arg(long)]
    pub experiment: Option<String>,
    #[arg(long)]
    pub kind: Option<JobKind>,
    #[arg(long)]
    pub status: Option<JobStatus>,
    /// Round id or EXPERIMENT/INDEX
    #[arg(long)]
    pub round: Option<String>,
    /// Conditions on hyperparameters and metrics: hp.lr<1e-4,metric.loss<2
    #[arg(long = "where")]
    pub where_: Option<String>,
    /// Sort key (submitted, hp.X, metric.X); prefix - for descending
    #[arg(long, allow_hyphen_values = true)]
    pub sort: Option<String>,
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip this many matching jobs first (with --limit: paging)
    #[arg(long)]
    pub offset: Option<usize>,
    /// Columns to show, e.g. job,name,hp.lr,metric.loss,duration
    /// [default: identity, start, duration, the hyperparameters that
    /// differ, key metrics, outputs]
    #[arg(long)]
    pub columns: Option<String>,
}

/// `herd history`: a table of jobs (or their ids, or JSON).
pub(super) fn history(c: &Client, args: &History, js: bool, quiet: bool) -> Result<()> {
    let History {
        experiment,
        kind,
        status,
        round,
        where_,
        sort,
        limit,
        offset,
        columns,
    } = args;
    let q = JobQuery {
        experiment: experiment
            .as_deref()
            .map(|e| resolve::experiment(c, e))
            .transpose()?,
        kind: *kind,
        status: *status,
        round: round.as_deref().map(|r| resolve::round(c, r)).transpose()?,
        ids: None,
        where_: where_.clone(),
        sort: sort.clone(),
        limit: *limit,
        offset: *offset,
    };
    let jobs = c.jobs(&q)?;
    if js {
        print(js, &json!(jobs), || {});
    } else if quiet {
        // One id per line, for `for j in $(herd -q history ...)`.
        jobs.iter().for_each(|j| println!("{}", j.id));
    } else {
        history_table(&jobs, columns.as_deref())?;
        // The table is only what survived: say when history lost events.
        repairs_note(&c.status()?["repairs"]);
    }
    Ok(())
}

/// `herd wait`: until every job ends; an error when one did not succeed.
pub(super) fn wait(c: &Client, ids: &[String], timeout: u64, js: bool) -> Result<()> {
    let ids = ids
        .iter()
        .map(|id| resolve::job(c, id).map(|i| i.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let mut show = crate::progress::Follow::new();
    let out = crate::progress::wait_all(c, &ids, Duration::from_secs(timeout), &mut show)?;
    print(js, &json!(out), || {
        out.iter().for_each(|j| println!("{}", job_row(j)))
    });
    if let Some(bad) = out.iter().find(|j| j.status != JobStatus::Succeeded) {
        return Err(ClientError::Api {
            status: 0,
            message: format!(
                "job {} {}: {}",
                bad.id,
                bad.status,
                bad.error.clone().unwrap_or_default()
            ),
        });
    }
    Ok(())
}
