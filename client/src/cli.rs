//! The `herd` command line: queue experiments, query history, watch,
//! reproduce, diff, export. Every command takes `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

use uuid::Uuid;

use crate::{
    Client, ClientError, InputRef, Job, JobKind, JobQuery, JobRequest, JobStatus, LineageNode,
    Result, RoundDetail,
};

#[derive(Parser)]
#[command(
    name = "herd",
    version,
    about = "Client for herdd: queue post-training experiments, query history, reproduce rounds",
    after_help = "Server and token come from --server/--token, HERD_SERVER/HERD_TOKEN, or the local daemon's data directory.\nExample: herd submit --kind sft --input model=HASH --input data=HASH --set lr=1e-5 --wait"
)]
pub struct Cli {
    /// Daemon address [default: http://127.0.0.1:7447]
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Bearer token (default: read from the daemon's data directory)
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// The daemon's data directory (to find its token)
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create or list experiments. Example: herd experiment create "arith-v1"
    Experiment {
        #[command(subcommand)]
        action: ExperimentAction,
    },
    /// Import a dataset (JSONL) or a Hugging Face model directory.
    /// Example: herd import dataset prefs.jsonl --kind preference
    Import {
        #[command(subcommand)]
        what: ImportWhat,
    },
    /// Submit a job. Example: herd submit --kind dpo --input model=H1 --input data=H2 --set beta=0.1
    Submit {
        #[arg(long)]
        kind: JobKind,
        /// name=HASH (or name=job:ID/output)
        #[arg(long = "input", value_parser = parse_input)]
        inputs: Vec<(String, InputRef)>,
        /// key=value hyperparameter (value parsed as JSON when it can be)
        #[arg(long = "set", value_parser = parse_kv)]
        sets: Vec<(String, String)>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        experiment: Option<Uuid>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Job ids this one waits for
        #[arg(long)]
        after: Vec<Uuid>,
        /// Wait for the job to end
        #[arg(long)]
        wait: bool,
    },
    /// Submit a round from a spec file (JSON), or show one. Example: herd round submit round.json
    Round {
        #[command(subcommand)]
        action: RoundAction,
    },
    /// Wait for jobs to end. Example: herd wait JOB --timeout 600
    Wait {
        ids: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
    /// Show a job: status, effective hyperparameters, inputs, outputs, last metrics.
    Show { id: String },
    /// Query run history. Example: herd history --kind dpo --where "beta<=0.1,metric.reward_accuracy>0.6" --sort -metric.reward_accuracy
    History {
        #[arg(long)]
        experiment: Option<Uuid>,
        #[arg(long)]
        kind: Option<JobKind>,
        #[arg(long)]
        status: Option<JobStatus>,
        #[arg(long)]
        round: Option<Uuid>,
        /// Conditions on hyperparameters and metrics: hp.lr<1e-4,metric.loss<2
        #[arg(long = "where")]
        where_: Option<String>,
        /// Sort key (submitted, hp.X, metric.X); prefix - for descending
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Lineage of a checkpoint or dataset, back to the base model and data.
    Lineage { hash: String },
    /// Live progress of running jobs (or one job) until they end.
    Watch { id: Option<String> },
    /// Plot metrics of a job to an SVG file and print sparklines.
    /// Example: herd plot JOB --metric loss --metric grad_norm --out loss.svg
    Plot {
        id: String,
        #[arg(long = "metric")]
        metrics: Vec<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compare two jobs or two rounds side by side.
    Diff { a: String, b: String },
    /// Re-run a job or a whole round with its recorded inputs, hyperparameters
    /// and seed, then compare output hashes. Example: herd reproduce ROUND
    Reproduce {
        id: String,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Write a checkpoint as a Hugging Face directory. Example: herd export HASH ./model
    Export { hash: String, dir: PathBuf },
    /// Verify the store: the event hash chain and every blob.
    Verify,
    /// Daemon status: devices and job counts.
    Status,
    /// Print shell completions. Example: herd completions bash > /etc/bash_completion.d/herd
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
pub enum ExperimentAction {
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Show {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum ImportWhat {
    /// A JSONL dataset: --kind preference|sft|prompts
    Dataset {
        file: PathBuf,
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json)
    Model {
        dir: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum RoundAction {
    Submit {
        spec: PathBuf,
        #[arg(long)]
        wait: bool,
    },
    Show {
        id: String,
    },
}

/// `name=REF`, REF a content hash or `job:<id>/<output>`.
fn parse_input(s: &str) -> std::result::Result<(String, InputRef), String> {
    let (k, v) = parse_kv(s)?;
    Ok((k, v.parse()?))
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Entry point for the `herd` binary: one clear line and exit 1 on error.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("herd: {e}");
            1
        }
    }
}

fn print(json_mode: bool, v: &impl serde::Serialize, human: impl FnOnce()) {
    if json_mode {
        println!("{}", serde_json::to_string_pretty(v).expect("json"));
    } else {
        human();
    }
}

fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

fn job_row(j: &Job) -> String {
    let metrics: Vec<String> = j
        .last_metrics
        .iter()
        .filter(|(k, _)| {
            [
                "loss",
                "accuracy",
                "reward_accuracy",
                "task_accuracy",
                "win_rate",
                "heldout_accuracy",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| format!("{k}={:.4}", v.1))
        .collect();
    format!(
        "{:<36}  {:<9} {:<10} {:<14} {}",
        j.id,
        j.kind,
        j.status,
        short(&j.name),
        metrics.join(" ")
    )
}

pub fn run(cli: &Cli) -> Result<()> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(*shell, &mut Cli::command(), "herd", &mut std::io::stdout());
        return Ok(());
    }
    let c = Client::connect(cli.server.clone(), cli.token.clone(), cli.data_dir.clone())?;
    let js = cli.json;
    match &cli.command {
        Command::Completions { .. } => unreachable!(),
        Command::Experiment { action } => match action {
            ExperimentAction::Create { name, description } => {
                let id = c.create_experiment(name, description)?;
                print(js, &json!({"id": id}), || println!("{id}"));
            }
            ExperimentAction::List => {
                let v = c.experiments()?;
                print(js, &v, || {
                    for e in &v {
                        println!(
                            "{}  {:<24} rounds={} jobs={}",
                            e.id,
                            e.name,
                            e.rounds.len(),
                            e.jobs.len()
                        );
                    }
                });
            }
            ExperimentAction::Show { id } => {
                let v = c.experiment(id)?;
                print(js, &v, || {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
                });
            }
        },
        Command::Import { what } => {
            let v = match what {
                ImportWhat::Dataset { file, kind, name } => {
                    let name = name.clone().unwrap_or_else(|| {
                        file.file_name()
                            .and_then(|s| s.to_str())
                            .unwrap_or("dataset")
                            .to_string()
                    });
                    c.import_dataset(file, kind, &name)?
                }
                ImportWhat::Model { dir, name } => {
                    let name = name.clone().unwrap_or_else(|| {
                        dir.file_name()
                            .and_then(|s| s.to_str())
                            .unwrap_or("model")
                            .to_string()
                    });
                    c.import_model(dir, &name)?
                }
            };
            print(js, &v, || {
                println!("{}", v.hash);
                let s = &v.summary;
                if let Some(p) = s.get("parameters") {
                    println!(
                        "  {} parameters, {} layers, hidden {}, vocab {}, {}",
                        p,
                        s["layers"],
                        s["hidden_size"],
                        s["vocab_size"],
                        s["dtype"].as_str().unwrap_or("unknown dtype")
                    );
                    for (n, shape) in s["shapes"].as_object().into_iter().flatten().take(6) {
                        println!("    {n}: {shape}");
                    }
                } else {
                    println!(
                        "  {} rows of {}",
                        s["rows"],
                        s["kind"].as_str().unwrap_or("unknown kind")
                    );
                    if let Some(h) = s.get("strength").and_then(|h| h.as_object()) {
                        println!(
                            "  strength: {}",
                            h.iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                        println!(
                            "  3-response share: {:.2}",
                            s["three_response_share"].as_f64().unwrap_or(0.0)
                        );
                    }
                }
            });
        }
        Command::Submit {
            kind,
            inputs,
            sets,
            seed,
            experiment,
            name,
            priority,
            after,
            wait,
        } => {
            let mut hp = serde_json::Map::new();
            for (k, v) in sets {
                hp.insert(
                    k.clone(),
                    serde_json::from_str(v).unwrap_or(Value::String(v.clone())),
                );
            }
            let req = JobRequest {
                kind: *kind,
                inputs: inputs.iter().cloned().collect::<BTreeMap<_, _>>(),
                hyperparameters: Value::Object(hp),
                seed: *seed,
                experiment: *experiment,
                name: name.clone(),
                priority: *priority,
                depends_on: after.clone(),
            };
            let v = c.submit(&req)?;
            let id = v.id.to_string();
            if *wait {
                let j = c.wait(&id, Duration::from_secs(24 * 3600))?;
                print(js, &json!(j), || println!("{}", job_row(&j)));
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
        }
        Command::Round { action } => match action {
            RoundAction::Submit { spec, wait } => {
                let text = crate::read_file(spec)?;
                let spec_v: Value = serde_json::from_str(&text).map_err(|e| {
                    ClientError::Usage(format!("{}: not valid JSON: {e}", spec.display()))
                })?;
                let v = c.submit_round(&spec_v)?;
                if *wait {
                    for id in &v.jobs {
                        c.wait(&id.to_string(), Duration::from_secs(24 * 3600))?;
                    }
                    let r = c.round(&v.id.to_string())?;
                    print(js, &r, || print_round(&r));
                } else {
                    print(js, &v, || println!("{}", v.id));
                }
            }
            RoundAction::Show { id } => {
                let r = c.round(id)?;
                print(js, &r, || print_round(&r));
            }
        },
        Command::Wait { ids, timeout } => {
            let mut out = vec![];
            for id in ids {
                out.push(c.wait(id, Duration::from_secs(*timeout))?);
            }
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
        }
        Command::Cancel { id } => {
            let v = c.cancel(id)?;
            print(js, &v, || println!("cancelling {id}"));
        }
        Command::Show { id } => {
            let j = c.job(id)?;
            print(js, &json!(j), || {
                println!("{} {} ({}) — {}", j.kind, j.name, j.id, j.status);
                if let Some(e) = &j.error {
                    println!("  error: {e}");
                }
                println!(
                    "  seed {}  attempts {}  device {}",
                    j.seed,
                    j.attempts,
                    j.device.clone().unwrap_or_default()
                );
                println!("  inputs:");
                for (k, v) in &j.inputs {
                    println!("    {k} = {}", j.resolved_inputs.get(k).unwrap_or(v));
                }
                println!(
                    "  hyperparameters: {}",
                    if j.effective_hyperparameters.is_null() {
                        &j.hyperparameters
                    } else {
                        &j.effective_hyperparameters
                    }
                );
                println!("  outputs:");
                for (k, v) in &j.outputs {
                    println!("    {k} = {v}");
                }
                println!("  last metrics:");
                for (k, (s, v)) in &j.last_metrics {
                    println!("    {k:<20} {v:<14.6} (step {s})");
                }
            });
        }
        Command::History {
            experiment,
            kind,
            status,
            round,
            where_,
            sort,
            limit,
        } => {
            let q = JobQuery {
                experiment: *experiment,
                kind: *kind,
                status: *status,
                round: *round,
                where_: where_.clone(),
                sort: sort.clone(),
                limit: *limit,
            };
            let jobs = c.jobs(&q)?;
            print(js, &json!(jobs), || {
                println!(
                    "{:<36}  {:<9} {:<10} {:<14} metrics",
                    "job", "kind", "status", "name"
                );
                jobs.iter().for_each(|j| println!("{}", job_row(j)));
            });
        }
        Command::Lineage { hash } => {
            let v = c.lineage(hash)?;
            print(js, &v, || print_lineage(&v, 0));
        }
        Command::Watch { id } => watch(&c, id.as_deref(), js)?,
        Command::Plot { id, metrics, out } => {
            let names: Vec<&str> = metrics.iter().map(|s| s.as_str()).collect();
            let series = c.metrics(id, &names)?;
            if series.is_empty() {
                return Err(ClientError::Usage(format!(
                    "job {id} has no metrics{}",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" named {}", names.join(", "))
                    }
                )));
            }
            let list: Vec<(String, Vec<(u64, f64)>)> = series.into_iter().collect();
            let path = out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.svg", short(id))));
            std::fs::write(&path, crate::plot::svg(&format!("job {id}"), &list)).map_err(|e| {
                ClientError::Io {
                    path: path.display().to_string(),
                    source: e,
                }
            })?;
            print(
                js,
                &json!({"file": path, "series": list.iter().map(|s| &s.0).collect::<Vec<_>>()}),
                || {
                    for (n, pts) in &list {
                        let vals: Vec<f64> = pts.iter().map(|p| p.1).collect();
                        println!(
                            "{n:<18} {} last={:.5}",
                            crate::plot::sparkline(&vals, 60),
                            vals.last().copied().unwrap_or(f64::NAN)
                        );
                    }
                    println!("wrote {}", path.display());
                },
            );
        }
        Command::Diff { a, b } => diff(&c, a, b, js)?,
        Command::Reproduce { id, timeout } => reproduce(&c, id, *timeout, js)?,
        Command::Export { hash, dir } => {
            let files = c.export(hash, dir)?;
            print(js, &json!({"dir": dir, "files": files}), || {
                println!("wrote {} files to {}", files.len(), dir.display())
            });
        }
        Command::Verify => {
            let v = c.verify()?;
            print(js, &v, || {
                if v.ok {
                    println!(
                        "ok: {} events chained, {} blobs ({} bytes) verified, {} artifacts present",
                        v.report["chain"]["events"],
                        v.report["blobs"]["blobs"],
                        v.report["blobs"]["bytes"],
                        v.report["artifacts_checked"]
                    );
                } else {
                    println!("BROKEN:");
                    v.problems.iter().for_each(|p| println!("  {p}"));
                }
            });
            if !v.ok {
                return Err(ClientError::Api {
                    status: 0,
                    message: format!("store verification failed: {}", v.error),
                });
            }
        }
        Command::Status => {
            let v = c.status()?;
            print(js, &v, || {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            });
        }
    }
    Ok(())
}

fn print_round(r: &RoundDetail) {
    println!("round {} (index {})", r.round.id, r.round.index);
    for j in &r.jobs {
        println!("  {}", job_row(j));
    }
}

fn print_lineage(v: &LineageNode, depth: usize) {
    let pad = "  ".repeat(depth);
    println!(
        "{pad}{} {} ({})",
        v.artifact.map_or("(kind not recorded)", |a| a.as_str()),
        v.name,
        short(&v.hash)
    );
    if let Some(job) = &v.job {
        println!("{pad}  <- {} job {} ({})", job.kind, job.name, job.id);
        for (name, child) in &job.inputs {
            print!("{pad}    {name}: ");
            print_lineage(child, depth + 3);
        }
    }
}

fn watch(c: &Client, id: Option<&str>, js: bool) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<24} [{bar:30}] {pos}/{len} {msg}")
        .expect("template")
        .progress_chars("=> ");
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    loop {
        let jobs: Vec<Job> = match id {
            Some(id) => vec![c.job(id)?],
            None => c.jobs(&JobQuery {
                status: Some(JobStatus::Running),
                ..Default::default()
            })?,
        };
        if js {
            println!("{}", serde_json::to_string(&jobs).expect("json"));
        }
        for j in &jobs {
            let bar = bars.entry(j.id.to_string()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(format!("{} {}", j.kind, short(&j.name)));
                b
            });
            if let Some(p) = j.progress {
                bar.set_length(p.total.max(1));
                bar.set_position(p.done);
            }
            let m: Vec<String> = j
                .last_metrics
                .iter()
                .filter(|(k, _)| !["lr", "tokens"].contains(&k.as_str()))
                .take(4)
                .map(|(k, v)| format!("{k}={:.4}", v.1))
                .collect();
            bar.set_message(format!("{} {}", j.status, m.join(" ")));
            if j.is_final() {
                bar.finish();
            }
        }
        let done = match id {
            Some(_) => jobs.iter().all(|j| j.is_final()),
            None => jobs.is_empty(),
        };
        if done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn diff(c: &Client, a: &str, b: &str, js: bool) -> Result<()> {
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
            name: x.name.clone(),
            rows: rows
                .into_iter()
                .map(|(section, key, a, b)| DiffRow {
                    same: a == b,
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
            println!("== {} : {} vs {}", d.name, d.a, d.b);
            for r in &d.rows {
                let mark = if r.same { " " } else { "*" };
                println!(
                    " {mark} {:<7} {:<22} {:<28} {}",
                    r.section,
                    r.key,
                    short_val(&r.a),
                    short_val(&r.b)
                );
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
    name: String,
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

fn short_val(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars().take(26).collect()
}

fn reproduce(c: &Client, id: &str, timeout: u64, js: bool) -> Result<()> {
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
