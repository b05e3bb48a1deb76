//! `herdd`: the daemon. `herdd --data-dir DIR [--listen ADDR]` serves the API;
//! `herdd worker --job-file F` runs one job (started by the daemon itself).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use herd_daemon::scheduler::SchedulerConfig;
use herd_daemon::server::{serve, DaemonConfig};

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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job (the daemon starts these; not for direct use).
    Worker {
        #[arg(long)]
        job_file: PathBuf,
    },
    /// With herdd stopped: move a damaged event log's bad suffix aside into
    /// DATA/log/quarantine (nothing is deleted), rebuild the index, and
    /// report how many acknowledged events were set aside.
    Repair,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Worker { job_file }) = &cli.command {
        std::process::exit(herd_daemon::worker::main(job_file));
    }
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(herd_client::default_data_dir);
    if let Some(Command::Repair) = &cli.command {
        std::process::exit(repair(&data_dir));
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
    let mut sched = SchedulerConfig::discover(vec![exe, "worker".into()], cli.cpu_jobs);
    if !cli.devices.is_empty() {
        for d in &cli.devices {
            if let Err(e) = herd_engine::device::select(d) {
                eprintln!("herdd: --devices: {e}");
                std::process::exit(2);
            }
        }
        sched.devices = cli.devices.clone();
    }
    if let Some(t) = cli.threads {
        sched.cpu_threads = t.max(1);
    }
    let config = DaemonConfig {
        data_dir,
        listen: cli.listen,
        scheduler: sched,
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

/// `herdd repair`: set a damaged log's suffix aside and re-index the rest.
fn repair(data_dir: &std::path::Path) -> i32 {
    let log_dir = data_dir.join("log");
    let _lock = match herd_daemon::server::lock_data_dir(data_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("herdd repair: {e:#}");
            return 1;
        }
    };
    match herd_store::repair(&log_dir) {
        Ok(r) => {
            match r.damaged_at {
                Some((seq, offset)) => println!(
                    "herdd repair: the log was damaged at sequence {seq} (byte {offset}): {}\n\
                     set aside {} acknowledged event(s) (and {} bytes of a torn last line) in {}/{}\n\
                     kept {} event(s); the old index is in {}/{}",
                    r.reason.as_deref().unwrap_or(""),
                    r.acknowledged_set_aside,
                    r.torn_bytes_set_aside,
                    data_dir.display(),
                    r.quarantine_file.as_deref().unwrap_or("?"),
                    r.events_kept,
                    data_dir.display(),
                    r.old_index.as_deref().unwrap_or("(none)"),
                ),
                None => println!(
                    "herdd repair: every record is intact ({} events); rebuilt the index (the old one is in {}/{})",
                    r.events_kept,
                    data_dir.display(),
                    r.old_index.as_deref().unwrap_or("(none)"),
                ),
            }
            0
        }
        Err(e) => {
            eprintln!("herdd repair: {e}");
            1
        }
    }
}
