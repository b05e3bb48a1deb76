//! `herdd`: the daemon. `herdd --data-dir DIR [--listen ADDR]` serves the API;
//! `herdd worker --job-file F` runs one job (started by the daemon itself).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use herd_core::{JobKind, Resources};
use herd_daemon::scheduler::SchedulerConfig;
use herd_daemon::server::{serve, DaemonConfig};
use herd_daemon::slurm::SlurmConfig;

#[derive(Parser)]
#[command(
    name = "herdd",
    version,
    about = "herd daemon: records post-training rounds and runs their jobs"
)]
struct Cli {
    /// Data directory (event log, blobs, token). Default: the user's data dir.
    #[arg(long, env = "HERD_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Address to listen on (loopback by default).
    #[arg(long, env = "HERD_LISTEN", default_value = "127.0.0.1:7447")]
    listen: SocketAddr,
    /// Where the web dashboard is served ("off": not at all). A busy port
    /// leaves the API running without it.
    #[arg(long, env = "HERD_DASHBOARD_LISTEN", default_value = "127.0.0.1:7448")]
    dashboard_listen: String,
    /// A further name the dashboard answers to (its `Host`), e.g. a reverse
    /// proxy's; repeat for more. Its own address (and localhost on
    /// loopback) always works; any other Host gets 421.
    #[arg(long = "dashboard-host")]
    dashboard_hosts: Vec<String>,
    /// Allow a non-loopback --listen address. The API is plain HTTP: put it
    /// behind TLS (an SSH tunnel or a reverse proxy) before it leaves the machine.
    #[arg(long)]
    allow_remote: bool,
    /// Number of jobs that may run on the CPU at once.
    #[arg(long, default_value_t = 1)]
    cpu_jobs: usize,
    /// Devices to use instead of discovery, e.g. "cpu,cuda:0,cuda:1".
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// CPU threads per job (default: cores / cpu-jobs).
    #[arg(long)]
    threads: Option<usize>,
    /// Where jobs run: `local` (child processes on this machine) or `slurm`
    /// (sbatch; the data directory must be on a filesystem the nodes share,
    /// at the same path, and the worker command must run there).
    #[arg(long, default_value = "local", value_parser = ["local", "slurm"])]
    executor: String,
    /// Slurm partition (sbatch --partition).
    #[arg(long)]
    slurm_partition: Option<String>,
    /// Slurm account (sbatch --account).
    #[arg(long)]
    slurm_account: Option<String>,
    /// Slurm QOS (sbatch --qos).
    #[arg(long)]
    slurm_qos: Option<String>,
    /// Time limit of every job unless its kind or the job says otherwise
    /// (minutes, H:MM:SS or D-HH:MM:SS).
    #[arg(long)]
    slurm_time: Option<String>,
    /// The GRES a job asks for per GPU: `gpu` gives --gres=gpu:N, `gpu:a100`
    /// gives --gres=gpu:a100:N.
    #[arg(long, default_value = "gpu")]
    slurm_gres: String,
    /// Resources of jobs: `cpus=4,gpus=1,mem=16G,time=2:00:00` for every
    /// kind, or `KIND:cpus=...` for one kind; repeatable; a job's own
    /// `--resources` overrides them field by field.
    #[arg(long)]
    slurm_resources: Vec<String>,
    /// One more sbatch argument for every job, as is; repeatable.
    #[arg(long, allow_hyphen_values = true)]
    slurm_arg: Vec<String>,
    /// Slurm jobs pending or running at once, at most.
    #[arg(long, default_value_t = 64)]
    slurm_max_jobs: usize,
    /// What Slurm failures start a new attempt: on-node-failure (node and
    /// boot failures, preemption) or never.
    #[arg(long, default_value = "on-node-failure")]
    slurm_requeue: String,
    /// How long the start-up probe job may take, queueing included (seconds).
    #[arg(long, default_value_t = 300)]
    slurm_probe_timeout: u64,
    /// The worker command on the nodes, if not this herdd's path (e.g.
    /// "/shared/bin/herdd worker").
    #[arg(long)]
    slurm_worker_command: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job (the daemon starts these; not for direct use).
    Worker {
        #[arg(long, required_unless_present = "probe")]
        job_file: Option<PathBuf>,
        /// Append messages to this file instead of stdout (Slurm workers).
        #[arg(long)]
        messages: Option<PathBuf>,
        /// Answer the Slurm start-up probe written at this path.
        #[arg(long, conflicts_with = "job_file")]
        probe: Option<PathBuf>,
    },
    /// With herdd stopped: compare the event log with what its index says
    /// was acknowledged and name what is damaged, missing or changed. With
    /// --accept-loss (needed whenever events would be lost), move the
    /// damaged suffix aside into DATA/log/quarantine (nothing is deleted),
    /// rebuild the index, and record the loss as an event.
    Repair {
        /// Set the damage aside even though events are lost; the loss is
        /// recorded (`HistoryRepaired`) and shown by verify and history.
        #[arg(long)]
        accept_loss: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Worker {
        job_file,
        messages,
        probe,
    }) = &cli.command
    {
        if let Some(p) = probe {
            std::process::exit(herd_daemon::slurm::answer_probe(p));
        }
        let job_file = job_file.as_deref().expect("clap requires --job-file");
        std::process::exit(herd_daemon::worker::main(job_file, messages.as_deref()));
    }
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(herd_client::default_data_dir);
    // Absolute, whatever the working directory (links and job files name it).
    let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
    if let Some(Command::Repair { accept_loss }) = &cli.command {
        std::process::exit(repair(&data_dir, *accept_loss));
    }
    herd_daemon::server::few_malloc_arenas();
    if !cli.listen.ip().is_loopback() {
        if !cli.allow_remote {
            eprintln!(
                "herdd: --listen {} is not a loopback address; the API is plain HTTP with a bearer \
                 token, readable by anyone on the network path. Pass --allow-remote to do it anyway \
                 (behind TLS: an SSH tunnel or a reverse proxy).",
                cli.listen
            );
            std::process::exit(2);
        }
        eprintln!(
            "herdd: WARNING: listening on {} over plain HTTP: the bearer token and all data cross \
             the network unencrypted; put TLS in front of it",
            cli.listen
        );
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "herdd".into());
    let worker = vec![exe, "worker".into()];
    let sched = if cli.executor == "slurm" {
        match slurm_config(&cli) {
            Ok(slurm) => {
                let worker = match &cli.slurm_worker_command {
                    Some(w) => w.split_whitespace().map(str::to_string).collect(),
                    None => worker,
                };
                SchedulerConfig::slurm(worker, slurm)
            }
            Err(e) => {
                eprintln!("herdd: {e}");
                std::process::exit(2);
            }
        }
    } else if !cli.devices.is_empty() || cli.threads.is_some() {
        for d in &cli.devices {
            if let Err(e) = herd_engine::device::select(d) {
                eprintln!("herdd: --devices: {e}");
                std::process::exit(2);
            }
        }
        let found = SchedulerConfig::discover(Vec::new(), cli.cpu_jobs).executor;
        let devices = if cli.devices.is_empty() {
            found.slots()
        } else {
            cli.devices.clone()
        };
        let threads = cli.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / cli.cpu_jobs.max(1)).max(1)
        });
        SchedulerConfig::local(worker, devices, threads)
    } else {
        SchedulerConfig::discover(worker, cli.cpu_jobs)
    };
    let dashboard = match cli.dashboard_listen.as_str() {
        "off" => None,
        addr => match addr.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() || cli.allow_remote => Some(a),
            Ok(a) => {
                eprintln!(
                    "herdd: --dashboard-listen {a} is not a loopback address; like the API it is plain HTTP. \
                     Pass --allow-remote (behind TLS) or keep it on loopback"
                );
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("herdd: --dashboard-listen {addr:?}: {e} (ADDR:PORT or off)");
                std::process::exit(2);
            }
        },
    };
    let config = DaemonConfig {
        dashboard_hosts: cli.dashboard_hosts.clone(),
        data_dir,
        listen: cli.listen,
        scheduler: sched,
        dashboard,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(config)) {
        eprintln!("herdd: {e:#}");
        std::process::exit(1);
    }
}

/// `--executor slurm`'s options, each checked with the flag it came from.
fn slurm_config(cli: &Cli) -> Result<SlurmConfig, String> {
    let mut c = SlurmConfig {
        partition: cli.slurm_partition.clone(),
        account: cli.slurm_account.clone(),
        qos: cli.slurm_qos.clone(),
        gres: cli.slurm_gres.clone(),
        extra_args: cli.slurm_arg.clone(),
        max_in_flight: cli.slurm_max_jobs.max(1),
        requeue: cli
            .slurm_requeue
            .parse()
            .map_err(|e| format!("--slurm-requeue: {e}"))?,
        probe_timeout: std::time::Duration::from_secs(cli.slurm_probe_timeout),
        ..SlurmConfig::default()
    };
    if let Some(t) = &cli.slurm_time {
        let r: Resources = format!("time={t}")
            .parse()
            .map_err(|e| format!("--slurm-time: {e}"))?;
        c.defaults.time_min = r.time_min;
    }
    for spec in &cli.slurm_resources {
        let (kind, text) = match spec.split_once(':') {
            Some((k, rest)) if !k.contains('=') => (Some(k), rest),
            _ => (None, spec.as_str()),
        };
        let r: Resources = text
            .parse()
            .map_err(|e| format!("--slurm-resources {spec:?}: {e}"))?;
        match kind {
            None => c.defaults = r.over(c.defaults),
            Some(k) => {
                let kind: JobKind = k
                    .parse()
                    .map_err(|e| format!("--slurm-resources {spec:?}: {e}"))?;
                c.per_kind.push((kind, r));
            }
        }
    }
    Ok(c)
}

/// `herdd repair`: set a damaged log's suffix aside and re-index the rest.
fn repair(data_dir: &std::path::Path, accept_loss: bool) -> i32 {
    let _lock = match herd_daemon::server::lock_data_dir(data_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("herdd repair: {e:#}");
            return 1;
        }
    };
    let repaired = match herd_daemon::repair::repair(data_dir, accept_loss) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herdd repair: {e:#}");
            return 1;
        }
    };
    let r = &repaired.report;
    let data = data_dir.display();
    println!("herdd repair: {}", r.finding());
    match (r.index_head, &r.index_note) {
        (Some(head), _) => println!("  the index recorded {head} acknowledged event(s)"),
        (None, Some(note)) => println!("  {note}"),
        (None, None) => {}
    }
    if let Some((first, last)) = r.lost {
        let events = if first == last {
            format!("event {first}")
        } else {
            format!("events {first}–{last}")
        };
        println!(
            "  lost: {events} ({} of them recorded as acknowledged by the index)",
            r.acknowledged_lost
        );
    }
    if !r.applied {
        eprintln!(
            "herdd repair: nothing was changed: repairing would lose the events above. \
             Copy DATA somewhere safe if you can; then run `herdd --data-dir {data} repair --accept-loss` \
             to set them aside (kept in DATA/log/quarantine) and record the loss in the history"
        );
        return 1;
    }
    if let Some(file) = &r.quarantine_file {
        println!(
            "  set aside {} whole record(s) (and {} bytes of a torn last line) in {data}/{file}",
            r.acknowledged_set_aside, r.torn_bytes_set_aside
        );
    }
    println!(
        "  kept {} event(s); rebuilt the index (the old one is in {data}/{})",
        r.events_kept,
        r.old_index.as_deref().unwrap_or("(none)")
    );
    for rec in &repaired.recorded {
        println!(
            "  recorded the loss as event {} (HistoryRepaired); {} job(s) whose later events may be lost are marked interrupted{}",
            rec.seq,
            rec.interrupted_jobs.len(),
            if rec.interrupted_jobs.is_empty() { "" } else { " (resubmit them with `herd reproduce JOB`)" }
        );
    }
    0
}
