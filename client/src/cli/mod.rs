//! The `herd` command line: queue experiments, query history, watch,
//! reproduce, diff, export. Every command takes `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

mod artifacts;
mod card;
mod compare;
mod daemon;
mod experiments;
mod jobs;
mod render;
mod resolve;
mod sweep;

use compare::{diff, reproduce, watch};
use daemon::repairs_note;
use render::{print, print_round, short, short_val};

use crate::{
    ArtifactKind, ArtifactQuery, Client, ClientError, InputRef, Job, JobKind, JobQuery, JobStatus,
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
    Submit(jobs::Submit),
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
    Sweep(sweep::Sweep),
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
        /// Dataset rows to show [default: 3]; with --output, that output's
        /// rows (herd show JOB --output rollouts --rows 5)
        #[arg(long)]
        rows: Option<usize>,
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
    History(jobs::History),
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
    /// Compare two jobs or two rounds side by side: what differs
    /// (hyperparameters, inputs, seed, metrics, outputs). Example:
    /// herd diff my-exp/0/sft my-exp/1/sft
    Diff {
        a: String,
        b: String,
        /// Show the rows that are the same too
        #[arg(long)]
        all: bool,
    },
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
        /// An adapter's base as PEFT should look it up (a Hub name or a
        /// local directory); default: the name recorded at the base's import
        #[arg(long)]
        base_name: Option<String>,
        /// Write the files exactly as recorded: no model card, an adapter's
        /// config untouched (a re-import gives the same hash)
        #[arg(long)]
        as_recorded: bool,
        /// `gguf`: a checkpoint as one GGUF file for llama.cpp and Ollama
        /// (default for a path ending in .gguf); else the recorded files
        #[arg(long)]
        format: Option<String>,
        /// GGUF weights: f16 or q8_0
        #[arg(long, default_value = "f16")]
        dtype: String,
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
    /// A new experiment (names are unique). Example: herd experiment create arith-v1 --description "..."
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every experiment, with its rounds and jobs counted
    List,
    /// One experiment (id or name): its rounds and their jobs
    Show { id: String },
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
    /// A verifier program for `grpo` (`--input verifier=HASH`): run in the
    /// job's directory, it reads one JSON line per completion (prompt,
    /// completion, answer, group, index) and prints one {"reward": x} line
    /// each. Example: herd import verifier score.py
    Verifier {
        file: PathBuf,
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
    /// Submit a round spec file (JSON; examples/round.json), its jobs as one DAG
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
    /// One round (id or EXPERIMENT/INDEX) and its jobs
    Show { id: String },
}

pub(super) fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
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
        Command::Submit(args) => jobs::submit(&c, args, js, cli.quiet)?,
        Command::Round { action } => experiments::round(&c, action, js, cli.quiet)?,
        Command::Dashboard { no_open } => daemon::dashboard(&c, *no_open, js)?,
        Command::Sweep(args) => sweep::run(&c, args, js, cli.quiet)?,
        Command::Wait { ids, timeout } => jobs::wait(&c, ids, *timeout, js)?,
        Command::Cancel { id } => {
            let v = c.cancel(&resolve::job(&c, id)?.to_string())?;
            print(js, &v, || println!("cancelling {id}"));
        }
        Command::Show {
            id,
            rows,
            output: None,
        } => match resolve::shown(&c, id)? {
            resolve::Shown::Artifact(hash) => artifacts::show(&c, &hash, rows.unwrap_or(3), js)?,
            resolve::Shown::Job(job) => jobs::show(&c, &job.to_string(), js)?,
        },
        Command::Show {
            id,
            output: Some(name),
            rows,
        } => {
            let j = c.job(&resolve::job(&c, id)?.to_string())?;
            let hash = j.outputs.get(name).ok_or_else(|| {
                ClientError::Usage(format!(
                    "job {} has no output {name:?} (it has: {})",
                    j.id,
                    j.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            match rows {
                // The output itself: a dataset's (or rollouts') rows.
                Some(n) => artifacts::show(&c, hash, *n, js)?,
                None => print(js, &json!({"output": name, "hash": hash}), || {
                    println!("{hash}")
                }),
            }
        }
        Command::History(args) => jobs::history(&c, args, js, cli.quiet)?,
        Command::Lineage { hash } => artifacts::lineage(&c, &resolve::hash(&c, hash)?, js)?,
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
        Command::Diff { a, b, all } => {
            let (a, b) = (resolve::job_or_round(&c, a)?, resolve::job_or_round(&c, b)?);
            diff(&c, &a, &b, *all, js)?
        }
        Command::Reproduce { id, timeout } => {
            reproduce(&c, &resolve::job_or_round(&c, id)?, *timeout, js)?
        }
        Command::Export {
            hash,
            to,
            force,
            base_name,
            as_recorded,
            format,
            dtype,
        } => {
            let gguf = match format.as_deref() {
                Some("gguf") => true,
                Some("safetensors" | "files") => false,
                Some(other) => {
                    return Err(ClientError::Usage(format!(
                        "--format {other}: gguf, or files (the recorded files, the default)"
                    )))
                }
                None => to.extension().is_some_and(|e| e == "gguf"),
            };
            let how = artifacts::ExportAs {
                force: *force,
                base_name: base_name.as_deref(),
                as_recorded: *as_recorded,
                gguf: gguf.then_some(dtype.as_str()),
            };
            artifacts::export(&c, &resolve::hash(&c, hash)?, to, &how, js)?
        }
        Command::Kinds { kind } => {
            let all: Vec<_> = c
                .kinds()?
                .into_iter()
                .filter(|k| kind.is_none_or(|want| k.kind == want))
                .collect();
            print(js, &json!(all), || render::kinds(&all, kind.is_some()));
        }
        Command::Verify => daemon::verify(&c, js)?,
        Command::Status => daemon::status(&c, js)?,
    }
    Ok(())
}
