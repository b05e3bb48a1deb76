//! The `herd` command line: queue experiments, query history, watch,
//! reproduce, diff, export. Every command takes `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

mod artifacts;
mod compare;
mod experiments;
mod jobs;
mod render;
mod resolve;
mod sweep;

use compare::{diff, reproduce, watch};
use render::{job_row, print, print_round, short, short_val};

use crate::{
    ArtifactKind, ArtifactQuery, Client, ClientError, InputRef, Job, JobKind, JobQuery, JobRequest,
    JobStatus, Result, RoundDetail,
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
    /// Print only the id or hash made (import, submit, experiment create,
    /// round submit), or the ids listed (history): for `X=$(herd -q ...)`
    #[arg(short, long, global = true)]
    pub quiet: bool,
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
        /// The job's kind (`herd kinds` lists them with their inputs)
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
        /// Experiment id or name
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Jobs this one waits for (id or EXPERIMENT/NAME)
        #[arg(long)]
        after: Vec<String>,
        /// What the job asks of a cluster executor, over the daemon's
        /// defaults: cpus=4,gpus=1,mem=16G,time=2:00:00 (Slurm only)
        #[arg(long)]
        resources: Option<herd_core::Resources>,
        /// Wait for the job to end
        #[arg(long)]
        wait: bool,
    },
    /// A one-time login link for the web dashboard (two minutes, one use),
    /// opened in a browser where one is available.
    Dashboard {
        /// Only print the link
        #[arg(long)]
        no_open: bool,
    },
    /// Submit a grid of one kind of job as one round, optionally averaging
    /// the best K outputs. Example: herd sweep --experiment E --kind sft
    /// --input model=H1 --input data=H2 --grid lr=1e-5,2e-5 --grid epochs=1,2
    /// --average-top 2 --by metric.loss
    Sweep {
        /// The kind of every point (`herd kinds` lists them)
        #[arg(long)]
        kind: JobKind,
        /// Experiment id or name (the sweep is one of its rounds)
        #[arg(long)]
        experiment: String,
        /// name=HASH (or name=job:ID/output), the same for every point
        #[arg(long = "input", value_parser = parse_input)]
        inputs: Vec<(String, InputRef)>,
        /// key=value, the same for every point
        #[arg(long = "set", value_parser = parse_kv)]
        sets: Vec<(String, String)>,
        /// key=v1,v2,...: one axis of the grid (repeat for more axes)
        #[arg(long = "grid", value_parser = parse_kv)]
        grid: Vec<(String, String)>,
        /// Every point's seed
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Average the best K outputs (an `average` job in the round)
        #[arg(long)]
        average_top: Option<usize>,
        /// metric.NAME that ranks the points (its last value)
        #[arg(long)]
        by: Option<String>,
        /// min or max [default: min for losses and perplexities, else max]
        #[arg(long)]
        order: Option<String>,
        /// What each job asks of a cluster executor (see submit)
        #[arg(long)]
        resources: Option<herd_core::Resources>,
        /// Wait for the round to end
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
    /// Show a job (status, effective hyperparameters, inputs, outputs, last
    /// metrics) or an artifact by hash (summary; a dataset's first rows).
    /// Example: herd show my-exp/sft; herd show HASH --rows 5
    Show {
        id: String,
        /// Dataset rows to show
        #[arg(long, default_value_t = 3)]
        rows: usize,
        /// Print only the hash of this output of the job (e.g. checkpoint)
        #[arg(long)]
        output: Option<String>,
    },
    /// List datasets and checkpoints. Example: herd artifacts --kind preference
    Artifacts {
        #[arg(long)]
        kind: Option<ArtifactKind>,
        /// Only imported ones
        #[arg(long)]
        imported: bool,
        /// Only job outputs
        #[arg(long)]
        produced: bool,
    },
    /// Query run history. Example: herd history --kind dpo --where "beta<=0.1,metric.reward_accuracy>0.6" --sort -metric.reward_accuracy
    History {
        /// Experiment id or name
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long)]
        kind: Option<JobKind>,
        #[arg(long)]
        status: Option<JobStatus>,
        /// Round id or EXPERIMENT/INDEX
        #[arg(long)]
        round: Option<String>,
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
        /// Columns to show, e.g. job,name,hp.lr,metric.loss,duration
        /// [default: identity, start, duration, the hyperparameters that
        /// differ, key metrics, outputs]
        #[arg(long)]
        columns: Option<String>,
    },
    /// Lineage of a checkpoint or dataset, back to the base model and data.
    Lineage { hash: String },
    /// Live progress of running jobs (or one job) until they end.
    Watch { id: Option<String> },
    /// Plot metrics of one or more jobs: sparklines here, and with --out an
    /// SVG or PNG, one panel per metric, a line per job.
    /// Example: herd plot my-exp/0/sft my-exp/1/sft --metric loss --out loss.png
    Plot {
        #[arg(required = true)]
        ids: Vec<String>,
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
    /// Write a checkpoint as a Hugging Face directory, or a dataset as a
    /// JSONL file. Example: herd export HASH ./model
    Export {
        hash: String,
        to: PathBuf,
        /// Overwrite what is there
        #[arg(long)]
        force: bool,
    },
    /// What each job kind takes, makes and its hyperparameters with
    /// defaults. Example: herd kinds dpo
    Kinds { kind: Option<JobKind> },
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
    /// A Hugging Face model directory (config.json, model.safetensors,
    /// tokenizer.json), or a PEFT LoRA adapter directory
    /// (adapter_config.json, adapter_model.safetensors) with --base
    Model {
        dir: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// For an adapter: the recorded checkpoint (hash) it adapts
        #[arg(long)]
        base: Option<String>,
        /// Give a model that ships no chat template one: llama3, chatml or
        /// a FILE.jinja (a `chat_format` job; the new checkpoint's hash is
        /// printed last)
        #[arg(long)]
        chat_template: Option<String>,
        /// With --chat-template: add the template's special tokens the
        /// vocabulary lacks, growing the embeddings (mean-resized)
        #[arg(long, requires = "chat_template")]
        add_special_tokens: bool,
    },
}

#[derive(Subcommand)]
pub enum RoundAction {
    Submit {
        spec: PathBuf,
        /// Set a round variable: --var prefs=HASH (over the spec's `vars`)
        #[arg(long = "var", value_parser = parse_kv)]
        vars: Vec<(String, String)>,
        /// The experiment (id or name), over the spec's
        #[arg(long)]
        experiment: Option<String>,
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
    // A closed pipe (`herd history | head -1`) ends the client quietly, as
    // it does `head` or `grep`, instead of a panic on the next write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
        Command::Experiment { action } => experiments::experiment(&c, action, js)?,
        Command::Import { what } => artifacts::import(&c, what, js, cli.quiet)?,
        Command::Artifacts {
            kind,
            imported,
            produced,
        } => {
            let q = ArtifactQuery {
                kind: *kind,
                produced: match (imported, produced) {
                    (true, false) => Some(false),
                    (false, true) => Some(true),
                    _ => None,
                },
            };
            artifacts::list(&c, &q, js)?
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
            resources,
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
                experiment: experiment
                    .as_deref()
                    .map(|e| resolve::experiment(&c, e))
                    .transpose()?,
                name: name.clone(),
                priority: *priority,
                depends_on: after
                    .iter()
                    .map(|a| resolve::job(&c, a))
                    .collect::<Result<_>>()?,
                resources: resources.unwrap_or_default(),
            };
            let v = c.submit(&req)?;
            let id = v.id.to_string();
            if *wait {
                if cli.quiet {
                    println!("{id}");
                }
                let mut show = crate::progress::Follow::new();
                let j = crate::progress::wait_all(
                    &c,
                    &[id.clone()],
                    Duration::from_secs(24 * 3600),
                    &mut show,
                )?
                .remove(0);
                if !cli.quiet {
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
        }
        Command::Round { action } => experiments::round(&c, action, js, cli.quiet)?,
        Command::Dashboard { no_open } => {
            let v = c.post("/dashboard/codes", &json!({}))?;
            let url = v["url"].as_str().unwrap_or_default().to_string();
            print(js, &v, || println!("{url}"));
            // $BROWSER, else xdg-open where there is a display; never fatal.
            let opener = std::env::var("BROWSER").ok().or_else(|| {
                (std::env::var_os("DISPLAY").is_some()
                    || std::env::var_os("WAYLAND_DISPLAY").is_some())
                .then(|| "xdg-open".to_string())
            });
            if let (false, Some(o)) = (*no_open, opener) {
                let _ = std::process::Command::new(o)
                    .arg(&url)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn();
            }
        }
        Command::Sweep {
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
        } => {
            let (spec, said) = sweep::plan(&sweep::SweepArgs {
                kind: *kind,
                inputs,
                sets,
                grid,
                seed: *seed,
                experiment: resolve::experiment(&c, experiment)?,
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
            if !cli.quiet {
                for line in &said {
                    eprintln!("  {line}");
                }
            }
            experiments::submit_round(&c, &spec, *wait, js, cli.quiet)?;
        }
        Command::Wait { ids, timeout } => {
            let ids = ids
                .iter()
                .map(|id| resolve::job(&c, id).map(|i| i.to_string()))
                .collect::<Result<Vec<_>>>()?;
            let mut show = crate::progress::Follow::new();
            let out =
                crate::progress::wait_all(&c, &ids, Duration::from_secs(*timeout), &mut show)?;
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
            let v = c.cancel(&resolve::job(&c, id)?.to_string())?;
            print(js, &v, || println!("cancelling {id}"));
        }
        Command::Show { id, rows, .. } if crate::BlobHash::is_valid(id) => {
            artifacts::show(&c, id, *rows, js)?
        }
        Command::Show {
            id,
            output: Some(name),
            ..
        } => {
            let j = c.job(&resolve::job(&c, id)?.to_string())?;
            let hash = j.outputs.get(name).ok_or_else(|| {
                ClientError::Usage(format!(
                    "job {} has no output {name:?} (it has: {})",
                    j.id,
                    j.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            print(js, &json!({"output": name, "hash": hash}), || {
                println!("{hash}")
            });
        }
        Command::Show { id, .. } => jobs::show(&c, &resolve::job(&c, id)?.to_string(), js)?,
        Command::History {
            experiment,
            kind,
            status,
            round,
            where_,
            sort,
            limit,
            offset,
            columns,
        } => {
            let q = JobQuery {
                experiment: experiment
                    .as_deref()
                    .map(|e| resolve::experiment(&c, e))
                    .transpose()?,
                kind: *kind,
                status: *status,
                round: round
                    .as_deref()
                    .map(|r| resolve::round(&c, r))
                    .transpose()?,
                where_: where_.clone(),
                sort: sort.clone(),
                limit: *limit,
                offset: *offset,
            };
            let jobs = c.jobs(&q)?;
            if js {
                print(js, &json!(jobs), || {});
            } else if cli.quiet {
                // One id per line, for `for j in $(herd -q history ...)`.
                jobs.iter().for_each(|j| println!("{}", j.id));
            } else {
                jobs::history_table(&jobs, columns.as_deref())?;
                // The table is only what survived: say when history lost events.
                repairs_note(&c.status()?["repairs"]);
            }
        }
        Command::Lineage { hash } => artifacts::lineage(&c, hash, js)?,
        Command::Watch { id } => {
            let id = id.as_deref().map(|i| resolve::job(&c, i)).transpose()?;
            watch(&c, id.map(|i| i.to_string()).as_deref(), js)?
        }
        Command::Plot { ids, metrics, out } => {
            let ids = ids
                .iter()
                .map(|id| resolve::job(&c, id).map(|i| i.to_string()))
                .collect::<Result<Vec<_>>>()?;
            jobs::plot(&c, &ids, metrics, out.as_ref(), js)?
        }
        Command::Diff { a, b } => {
            let (a, b) = (resolve::job_or_round(&c, a)?, resolve::job_or_round(&c, b)?);
            diff(&c, &a, &b, js)?
        }
        Command::Reproduce { id, timeout } => {
            reproduce(&c, &resolve::job_or_round(&c, id)?, *timeout, js)?
        }
        Command::Export { hash, to, force } => artifacts::export(&c, hash, to, *force, js)?,
        Command::Kinds { kind } => {
            let all: Vec<_> = c
                .kinds()?
                .into_iter()
                .filter(|k| kind.is_none_or(|want| k.kind == want))
                .collect();
            print(js, &json!(all), || render::kinds(&all, kind.is_some()));
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
                repairs_note(&v.report["repairs"]);
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
                let devices: Vec<String> = v["devices"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect();
                println!("herdd at {} — devices: {}", c.server(), devices.join(", "));
                let jobs = &v["jobs"];
                println!(
                    "jobs: {} queued, {} running, {} succeeded, {} failed, {} cancelled, {} interrupted",
                    jobs["queued"],
                    jobs["running"],
                    jobs["succeeded"],
                    jobs["failed"],
                    jobs["cancelled"],
                    jobs["interrupted"]
                );
                println!("events recorded: {}", v["head_seq"]);
                repairs_note(&v["repairs"]);
            });
        }
    }
    Ok(())
}

/// Print each recorded loss (`herdd repair --accept-loss`): whatever a
/// command shows of the record, it must not pass for the whole of it.
fn repairs_note(repairs: &serde_json::Value) {
    for r in repairs.as_array().into_iter().flatten() {
        if let Some(m) = r["message"].as_str() {
            println!("NOTE: {}", herd_core::vocab::printable(m));
        }
    }
}
