//! The main job: a multi-round Llama 3 post-training loop that measurably
//! improves a model, on the embedded default (sled in a local data
//! directory, CPU), with nothing downloaded.
//!
//! 1. Build a tiny Llama (byte-level tokenizer) from random init and teach it
//!    a checkable task (one-digit addition) by SFT — briefly, so it is weak.
//! 2. Run rounds of annotate -> curate -> rm -> sample -> sft -> dpo (x2) ->
//!    average -> eval, each round starting from the last round's policy.
//! 3. Reproduce one round and check that every output hash is identical.
//!
//! Everything goes through the daemon's HTTP API with the client library,
//! exactly as a user's scripts would.
//!
//! With `--model DIR` the same rounds run on a user's Hugging Face model (its
//! own template and tokens) instead of the tiny one, at a smaller scale and
//! with learning rates for a pretrained model; models over ~50M parameters
//! train LoRA adapters (merged after each training job, so every round's
//! policy is a plain checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use herd_client::{Client, InputRef, JobKind, JobRequest, JobStatus};
use herd_daemon::scheduler::SchedulerConfig;
use herd_daemon::server::{Daemon, DaemonConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

mod round;

pub use round::{grpo_round_spec, round_spec, round_spec_with, Training};

/// How each round improves the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Llama 3's loop: annotate, RM, rejection sampling, SFT, DPO, average.
    #[default]
    Llama3,
    /// Online RL with the task's checker as a verifiable reward.
    Grpo,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Where the daemon keeps its data (a temp dir when None).
    pub data_dir: Option<PathBuf>,
    pub rounds: usize,
    /// How to start a worker process: program and leading args.
    pub worker_command: Vec<String>,
    pub quiet: bool,
    /// A Hugging Face model directory to run the rounds on (None: build
    /// the tiny model from scratch).
    pub model: Option<PathBuf>,
    /// LoRA rank for `--model` (None: 16 over ~50M parameters, else full
    /// fine-tuning; 0 forces full fine-tuning).
    pub lora_rank: Option<usize>,
    pub method: Method,
}

/// One row of the results table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundRow {
    pub round: usize,
    pub rm_accuracy: f64,
    pub task_accuracy: f64,
    pub previous_accuracy: f64,
    /// Win rate of the new policy over the previous one, judged by the RM.
    pub win_rate: f64,
    /// The same, judged by the task's checker (ties count half).
    pub checker_win_rate: f64,
    /// GRPO: the mean reward over the round's samples (NaN otherwise).
    pub reward: f64,
    /// The preference datasets this round's RM trained on (the `mix` job's
    /// inputs: every earlier round's annotations and this round's).
    pub rm_data_inputs: BTreeMap<String, String>,
    /// This round's annotations (`annotate`'s output hash).
    pub annotations: String,
    pub seconds: f64,
    pub jobs: usize,
    pub succeeded: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    #[serde(skip)]
    pub method: Method,
    pub base_accuracy: f64,
    pub rounds: Vec<RoundRow>,
    pub reproduced_round: usize,
    pub reproduced_identical: bool,
    pub store_verified: bool,
    pub data_dir: PathBuf,
    pub total_seconds: f64,
}

struct Sizes {
    base_steps: u64,
    corpus: usize,
    train_prompts: usize,
    heldout_prompts: usize,
    epochs: f64,
}

/// The smoke run (`--smoke`, the end-to-end test) is the same work with
/// fewer rounds, so its numbers are the quickstart's numbers. A user's
/// model runs a smaller set (each of its steps costs far more).
fn sizes(user_model: bool) -> Sizes {
    if user_model {
        return Sizes {
            base_steps: 40,
            corpus: 120,
            train_prompts: 64,
            heldout_prompts: 32,
            epochs: 1.0,
        };
    }
    Sizes {
        base_steps: 290,
        corpus: 300,
        train_prompts: 400,
        heldout_prompts: 50,
        epochs: 4.0,
    }
}

fn tiny_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 264, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 160, "tie_word_embeddings": true,
        "bos_token_id": 256, "eos_token_id": 260, "pad_token_id": 263, "torch_dtype": "float32"
    })
}

/// Three-digit numbers without a trailing zero, in a fixed shuffled order.
fn numbers() -> Vec<u32> {
    let mut v: Vec<u32> = (100..1000).filter(|n| n % 10 != 0).collect();
    herd_engine::rng::Rng::new(2024).shuffle(&mut v);
    v
}

fn prompt(n: u32) -> String {
    format!("Reverse the digits of {n}.")
}

fn reversed(n: u32) -> String {
    n.to_string().chars().rev().collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    std::fs::write(
        path,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .with_context(|| path.display().to_string())
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{prefix:<12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    b
}

/// Wait for jobs, showing which one runs and its progress: a bar on a
/// terminal; `lines` (not quiet, not a terminal): a plain line per job as
/// its state changes and every few seconds.
fn wait_all(
    c: &Client,
    ids: &[String],
    pb: &ProgressBar,
    lines: &mut Option<herd_client::progress::Follow>,
) -> Result<Vec<herd_client::Job>> {
    pb.set_length(ids.len() as u64);
    loop {
        let jobs: Vec<herd_client::Job> =
            ids.iter().map(|id| c.job(id)).collect::<Result<_, _>>()?;
        if let Some(f) = lines {
            jobs.iter().for_each(|j| f.update(j));
        }
        let done = jobs.iter().filter(|j| j.is_final()).count();
        pb.set_position(done as u64);
        if let Some(j) = jobs.iter().find(|j| j.status == JobStatus::Running) {
            let p = j
                .progress
                .map(|p| format!(" {}/{}", p.done, p.total))
                .unwrap_or_default();
            let loss = j
                .metric("loss")
                .map(|l| format!(" loss {l:.3}"))
                .unwrap_or_default();
            pb.set_message(format!("{}{p}{loss}", j.name));
        }
        if let Some(f) = jobs
            .iter()
            .find(|j| matches!(j.status, JobStatus::Failed | JobStatus::Cancelled))
        {
            bail!(
                "job {} ({}) {}: {}",
                f.name,
                f.id,
                f.status,
                f.error.clone().unwrap_or_default()
            );
        }
        if done == jobs.len() {
            return Ok(jobs);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hash_of(v: &herd_client::Imported) -> Result<String> {
    Ok(v.hash.clone())
}

/// The tiny model from random init, with its byte-level tokenizer and the
/// files transformers reads beside it; imported, its hash.
fn build_tiny(c: &Client, work: &Path) -> Result<String> {
    let init_dir = work.join("init");
    let cfg = herd_engine::LlamaConfig::from_json(&tiny_config(), "quickstart config")?;
    let model = herd_engine::Llama::init(cfg, 7, &candle_core::Device::Cpu)?;
    std::fs::create_dir_all(&init_dir)?;
    let tok = init_dir.join(herd_engine::checkpoint::TOKENIZER);
    std::fs::write(&tok, herd_engine::chat::byte_tokenizer_json().to_string())?;
    // What transformers and serving stacks read beside the tokenizer: the
    // chat template, special tokens, stop tokens.
    let chat = herd_engine::chat::ChatFormat::from_file(&tok)?;
    for (name, json) in
        herd_engine::chat::hf_tokenizer_files(&chat, model.config.max_position_embeddings)
    {
        std::fs::write(init_dir.join(name), serde_json::to_string_pretty(&json)?)?;
    }
    herd_engine::checkpoint::save_model(&model, &init_dir, None)?;
    hash_of(&c.import_model(&init_dir, "random-init")?)
}

pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let temp = tempfile::tempdir()?;
    let data_dir = opts
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("herd-data"));
    let work = data_dir.join("quickstart");
    std::fs::create_dir_all(&work)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = DaemonConfig {
        dashboard_hosts: vec![],
        data_dir: data_dir.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        scheduler: SchedulerConfig::local(
            opts.worker_command.clone(),
            vec!["cpu".into(), "cpu".into()],
            1,
        ),
        dashboard: None,
    };
    let daemon = rt.block_on(Daemon::start(config))?;
    let result = drive(opts, &daemon, &data_dir, &work, started);
    rt.block_on(daemon.shutdown())?;
    let mut report = result?;
    report.total_seconds = started.elapsed().as_secs_f64();
    if opts.data_dir.is_none() {
        report.data_dir = PathBuf::from("(temporary, removed)");
    }
    Ok(report)
}

fn drive(
    opts: &Options,
    daemon: &Daemon,
    data_dir: &Path,
    work: &Path,
    started: Instant,
) -> Result<Report> {
    let say = |s: String| {
        if !opts.quiet {
            eprintln!("{s}");
        }
    };
    let c = Client::new(&format!("http://{}", daemon.addr), &daemon.token);
    let z = sizes(opts.model.is_some());
    say(format!(
        "herd quickstart: daemon at http://{} with data in {}",
        daemon.addr,
        data_dir.display()
    ));
    let exp = c.create_experiment("quickstart", "Llama 3 post-training loop on digit reversal")?;

    // 1. A tiny model from random init (or the user's), and the task's data.
    let (init, training) = match &opts.model {
        Some(dir) => {
            let name = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model")
                .to_string();
            let imported = c
                .import_model(dir, &name)
                .with_context(|| format!("importing {}", dir.display()))?;
            if imported.summary["chat"].is_null() {
                bail!(
                    "{} ships no chat template; give it one first: herd import model {} --chat-template chatml --add-special-tokens",
                    dir.display(),
                    dir.display()
                );
            }
            let params = imported.summary["parameters"].as_u64().unwrap_or(0);
            let rank = opts
                .lora_rank
                .unwrap_or(if params > 50_000_000 { 16 } else { 0 });
            say(format!(
                "model {name}: {params} parameters, {}",
                if rank > 0 {
                    format!("LoRA rank {rank}")
                } else {
                    "full fine-tuning".into()
                }
            ));
            (imported.hash, Training::pretrained(rank))
        }
        None => (build_tiny(&c, work)?, Training::TINY),
    };
    let all = numbers();
    // Disjoint slices: held-out prompts, the base corpus, the rounds' prompts.
    let heldout: Vec<u32> = all[..z.heldout_prompts].to_vec();
    let base_numbers: Vec<u32> = all[z.heldout_prompts..z.heldout_prompts + z.corpus].to_vec();
    let train: Vec<u32> = all[z.heldout_prompts + z.corpus..]
        .iter()
        .copied()
        .take(z.train_prompts)
        .collect();
    let corpus: Vec<Value> = base_numbers.iter().map(|n| json!({"prompt": prompt(*n), "completion": herd_daemon::task::corrected(&reversed(*n))})).collect();
    let ask = |ps: &[u32]| -> Vec<Value> {
        ps.iter()
            .map(|n| json!({"prompt": prompt(*n), "answer": reversed(*n)}))
            .collect()
    };
    write_jsonl(&work.join("corpus.jsonl"), &corpus)?;
    write_jsonl(&work.join("prompts.jsonl"), &ask(&train))?;
    write_jsonl(&work.join("heldout.jsonl"), &ask(&heldout))?;
    let corpus_h =
        hash_of(&c.import_dataset(&work.join("corpus.jsonl"), "sft", "addition-corpus")?)?;
    let prompts_h =
        hash_of(&c.import_dataset(&work.join("prompts.jsonl"), "prompts", "train-prompts")?)?;
    let heldout_h =
        hash_of(&c.import_dataset(&work.join("heldout.jsonl"), "prompts", "heldout-prompts")?)?;

    // Off a terminal the bars draw nothing: print plain lines instead.
    let mut lines = (!opts.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(herd_client::progress::Follow::plain);
    let pb = bar(opts.quiet, 2, "base model");
    let experiment: uuid::Uuid = exp.parse()?;
    let base_job = c
        .submit(&JobRequest {
            name: Some("base-sft".into()),
            experiment: Some(experiment),
            inputs: BTreeMap::from([
                ("model".into(), input(&init)?),
                ("data".into(), input(&corpus_h)?),
            ]),
            hyperparameters: if opts.model.is_none() {
                json!({"lr": 3e-3, "steps": z.base_steps, "batch_size": 32, "warmup_steps": 10, "max_seq_len": 160})
            } else {
                json!({"lr": training.sft_lr, "steps": z.base_steps, "batch_size": 8, "warmup_steps": 5, "max_seq_len": 160,
                       "lora_rank": training.lora_rank, "lora_alpha": 2 * training.lora_rank})
            },
            seed: 1,
            ..JobRequest::new(JobKind::Sft)
        })?
        .id
        .to_string();
    let base_sft = wait_all(&c, std::slice::from_ref(&base_job), &pb, &mut lines)?.remove(0);
    let base = if training.lora_rank > 0 {
        let merge = c
            .submit(&JobRequest {
                name: Some("base-merge".into()),
                experiment: Some(experiment),
                inputs: BTreeMap::from([
                    ("model".into(), input(&init)?),
                    ("adapter".into(), input(&base_sft.outputs["adapter"])?),
                ]),
                ..JobRequest::new(JobKind::Merge)
            })?
            .id
            .to_string();
        wait_all(&c, &[merge], &pb, &mut lines)?[0].outputs["checkpoint"].clone()
    } else {
        base_sft.outputs["checkpoint"].clone()
    };
    let eval_job = c
        .submit(&JobRequest {
            name: Some("base-eval".into()),
            experiment: Some(experiment),
            inputs: BTreeMap::from([
                ("policy".into(), input(&base)?),
                ("prompts".into(), input(&heldout_h)?),
            ]),
            hyperparameters: json!({"max_new_tokens": 24, "batch_size": training.batch}),
            ..JobRequest::new(JobKind::Eval)
        })?
        .id
        .to_string();
    let base_accuracy = wait_all(&c, &[base_job, eval_job.clone()], &pb, &mut lines)?[1]
        .metric("task_accuracy")
        .unwrap_or(0.0);
    pb.finish_with_message(format!("held-out accuracy {base_accuracy:.3}"));

    // 2. Rounds.
    let mut rows = vec![];
    let mut round_ids = vec![];
    for r in 1..=opts.rounds {
        let t = Instant::now();
        let mut vars = BTreeMap::from([
            ("prompts".to_string(), prompts_h.clone()),
            ("heldout".to_string(), heldout_h.clone()),
            ("base".to_string(), base.clone()),
        ]);
        if r == 1 {
            vars.insert("policy".into(), base.clone());
        }
        // Both methods draw the same number of samples a round.
        let samples = z.train_prompts * (training.k + 2);
        let spec = match opts.method {
            Method::Llama3 => round_spec_with(experiment, vars, 100 * r as u64, z.epochs, training),
            Method::Grpo => grpo_round_spec(experiment, vars, 100 * r as u64, training, samples),
        };
        let sub = c.submit_round(&spec)?;
        let ids: Vec<String> = sub.jobs.iter().map(|id| id.to_string()).collect();
        round_ids.push(sub.id.to_string());
        let pb = bar(opts.quiet, ids.len() as u64, &format!("round {r}"));
        let jobs = wait_all(&c, &ids, &pb, &mut lines)?;
        let by = |n: &str| jobs.iter().find(|j| j.name == n);
        let eval = by("eval").context("round has no eval")?;
        // GRPO rounds have no reward model, preferences or annotations.
        let rm_acc = by("rm")
            .and_then(|j| {
                j.summary
                    .get("heldout_accuracy")
                    .or_else(|| j.summary.pointer("/result/heldout_accuracy"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(f64::NAN);
        let reward = by("grpo")
            .and_then(|j| {
                j.summary
                    .get("reward_mean")
                    .or_else(|| j.summary.pointer("/result/reward_mean"))
            })
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NAN);
        let row = RoundRow {
            round: r,
            rm_accuracy: rm_acc,
            task_accuracy: eval.metric("task_accuracy").unwrap_or(0.0),
            previous_accuracy: eval.metric("baseline_task_accuracy").unwrap_or(0.0),
            win_rate: eval.metric("win_rate").unwrap_or(f64::NAN),
            reward,
            checker_win_rate: eval.metric("checker_win_rate").unwrap_or(0.0),
            rm_data_inputs: by("preferences")
                .map(|j| {
                    j.inputs
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            annotations: by("annotate")
                .and_then(|j| j.outputs.get("data").cloned())
                .unwrap_or_default(),
            seconds: t.elapsed().as_secs_f64(),
            jobs: jobs.len(),
            succeeded: jobs
                .iter()
                .filter(|j| j.status == JobStatus::Succeeded)
                .count(),
        };
        pb.finish_with_message(format!("task accuracy {:.3}", row.task_accuracy));
        rows.push(row);
    }

    // 3. Reproduce the first round: same inputs, hyperparameters and seeds.
    let reproduced_round = 1;
    let pb = bar(opts.quiet, 1, "reproduce");
    let rep = c.reproduce_round(&round_ids[reproduced_round - 1])?;
    let pairs: Vec<(String, String)> = rep
        .jobs
        .iter()
        .map(|p| (p.original.to_string(), p.reproduction.to_string()))
        .collect();
    let news: Vec<String> = pairs.iter().map(|p| p.1.clone()).collect();
    let reproduced = wait_all(&c, &news, &pb, &mut lines)?;
    let mut identical = true;
    for ((orig, _), new) in pairs.iter().zip(&reproduced) {
        let o = c.job(orig)?;
        if o.outputs != new.outputs {
            identical = false;
            say(format!(
                "  {}: outputs differ: {:?} vs {:?}",
                o.name, o.outputs, new.outputs
            ));
        }
    }
    pb.finish_with_message(if identical {
        "all output hashes identical".to_string()
    } else {
        "outputs differ".to_string()
    });
    let verified = c.verify()?.ok;
    Ok(Report {
        method: opts.method,
        base_accuracy,
        rounds: rows,
        reproduced_round,
        reproduced_identical: identical,
        store_verified: verified,
        data_dir: data_dir.to_path_buf(),
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The table the README shows.
pub fn table(r: &Report) -> String {
    if r.method == Method::Grpo {
        return grpo_table(r);
    }
    let mut s = String::new();
    s.push_str("| round | RM trained on | RM held-out accuracy | policy task accuracy (held-out) | previous policy | win rate vs previous: RM | checker | wall time |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    s.push_str(&format!(
        "| base | – | – | {:.3} | – | – | – | – |\n",
        r.base_accuracy
    ));
    for row in &r.rounds {
        let n = row.rm_data_inputs.len();
        s.push_str(&format!(
            "| {} | {n} round{} of preferences | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} s |\n",
            row.round,
            if n == 1 { "" } else { "s" },
            row.rm_accuracy,
            row.task_accuracy,
            row.previous_accuracy,
            row.win_rate,
            row.checker_win_rate,
            row.seconds
        ));
    }
    s + &footer(r)
}

/// What both tables end with: the reproduction and the store's check.
fn footer(r: &Report) -> String {
    format!(
        "\nreproduced round {}: {}; store verified: {}; total {:.0} s\n",
        r.reproduced_round,
        if r.reproduced_identical {
            "all output hashes identical"
        } else {
            "OUTPUTS DIFFER"
        },
        r.store_verified,
        r.total_seconds
    )
}

/// A hash or `job:<id>/<output>` the daemon gave us, as a typed input.
fn input(reference: &str) -> Result<InputRef> {
    reference.parse().map_err(anyhow::Error::msg)
}

/// The table of a GRPO run: no reward model, so win rates are the checker's.
fn grpo_table(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("| round | mean reward (samples) | policy task accuracy (held-out) | previous policy | checker win rate vs previous | wall time |\n");
    s.push_str("|---|---|---|---|---|---|\n");
    s.push_str(&format!(
        "| base | – | {:.3} | – | – | – |\n",
        r.base_accuracy
    ));
    for row in &r.rounds {
        s.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} s |\n",
            row.round,
            row.reward,
            row.task_accuracy,
            row.previous_accuracy,
            row.checker_win_rate,
            row.seconds
        ));
    }
    s + &footer(r)
}
