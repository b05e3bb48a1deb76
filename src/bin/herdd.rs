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
    #[arg(long, default_value = "127.0.0.1:7447")]
    listen: SocketAddr,
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
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Worker { job_file }) = &cli.command {
        std::process::exit(herd_daemon::worker::main(job_file));
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
        data_dir: cli.data_dir.unwrap_or_else(herd_client::default_data_dir),
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
