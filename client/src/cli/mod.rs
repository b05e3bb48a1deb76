//! The `herd` command line: queue experiments, query history, watch,
//! reproduce, diff, export. Every command takes `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

use uuid::Uuid;

mod compare;
mod render;

use compare::{diff, reproduce, watch};
use render::{job_row, print, print_lineage, print_round, short, short_val};

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
        /// Skip this many matching jobs first (with --limit: paging)
        #[arg(long)]
        offset: Option<usize>,
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
            offset,
        } => {
            let q = JobQuery {
                experiment: *experiment,
                kind: *kind,
                status: *status,
                round: *round,
                where_: where_.clone(),
                sort: sort.clone(),
                limit: *limit,
                offset: *offset,
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
