//! Workers as child processes of the daemon, one per device slot. A worker
//! writes its messages on stdout; stopping it kills it; it dies with the
//! daemon, so a restart requeues its job (see the scheduler's recovery).

use std::process::Stdio;

use anyhow::{anyhow, Context, Result};
use herd_core::model::JobView;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use super::{
    BoxFuture, Ending, Executor, ExecutorHandle, Follow, Launch, Next, Placement, Started,
};

pub struct LocalExecutor {
    /// Program and leading arguments that start a worker (`herdd worker`).
    worker_command: Vec<String>,
    /// One slot each: "cpu" may repeat, "cuda:N".
    devices: Vec<String>,
    /// CPU threads given to each job on a CPU slot.
    cpu_threads: usize,
}

impl LocalExecutor {
    pub fn new(worker_command: Vec<String>, devices: Vec<String>, cpu_threads: usize) -> Self {
        LocalExecutor {
            worker_command,
            devices,
            cpu_threads: cpu_threads.max(1),
        }
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn slots(&self) -> Vec<String> {
        self.devices.clone()
    }

    fn placement(&self, _job: &JobView, slot: usize) -> Placement {
        let device = self.devices[slot].clone();
        let threads = if device == "cpu" { self.cpu_threads } else { 1 };
        Placement { device, threads }
    }

    fn start<'a>(&'a self, launch: Launch<'a>) -> BoxFuture<'a, Result<Started>> {
        Box::pin(async move {
            let (prog, args) = self
                .worker_command
                .split_first()
                .ok_or_else(|| anyhow!("no worker command"))?;
            let threads = launch.placement.threads.to_string();
            let mut child = tokio::process::Command::new(prog)
                .args(args)
                .arg("--job-file")
                .arg(&launch.job_file)
                .env("RAYON_NUM_THREADS", &threads)
                .env("CANDLE_NUM_THREADS", &threads)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {prog}"))?;
            let pid = child.id();
            let stdout = child.stdout.take().expect("piped");
            let mut stderr = child.stderr.take().expect("piped");
            // The last 2,000 characters the worker wrote on stderr: said
            // with its ending when it reported none itself.
            let stderr_tail = tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = stderr.read_to_end(&mut buf).await;
                let text = String::from_utf8_lossy(&buf);
                let skip = text.chars().count().saturating_sub(2000);
                text.chars().skip(skip).collect::<String>()
            });
            Ok(Started {
                handle: ExecutorHandle {
                    executor: "local".into(),
                    id: pid.map_or_else(|| "?".into(), |p| p.to_string()),
                },
                pid,
                follow: Box::new(LocalFollow {
                    child,
                    lines: BufReader::new(stdout).lines(),
                    stderr_tail: Some(stderr_tail),
                }),
            })
        })
    }
}

struct LocalFollow {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr_tail: Option<tokio::task::JoinHandle<String>>,
}

impl Follow for LocalFollow {
    fn next(&mut self) -> BoxFuture<'_, Result<Next>> {
        Box::pin(async move {
            if let Some(line) = self.lines.next_line().await? {
                return Ok(Next::Line(line));
            }
            let status = self.child.wait().await?;
            let tail = match self.stderr_tail.take() {
                Some(t) => t.await.unwrap_or_default(),
                None => String::new(),
            };
            let how = match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (_, Some(sig)) => format!("worker killed by signal {sig}"),
                (Some(c), _) => format!("worker exited with status {c}"),
                _ => "worker ended abnormally".into(),
            };
            let tail = tail.trim();
            Ok(Next::Ended(Ending::Ended {
                ok: status.success(),
                how: if tail.is_empty() {
                    how
                } else {
                    format!("{how}; stderr: {tail}")
                },
            }))
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.child.start_kill();
        })
    }
}
