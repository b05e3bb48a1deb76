//! Workers as Slurm jobs: `sbatch` of a script that runs `herdd worker` on
//! a node; the slots are the cap on jobs in flight. The worker appends its
//! messages to a file in the job's work directory (the data directory is
//! shared with the nodes), followed by offset while `scontrol` is asked for
//! the job's state; what that state means for the attempt is decided here.
//! Stopping is `scancel`. Jobs run on when the daemon stops; a restarted
//! daemon re-attaches by the Slurm job id in the record and reads the
//! messages file again from the start. `crate::slurm` wraps the commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use herd_core::model::JobView;

use super::{
    BoxFuture, Ending, Executor, ExecutorHandle, Follow, Launch, Next, Placement, Started,
};
use crate::slurm::{self, Observed, RequeuePolicy, SlurmConfig};
use crate::worker::WorkerMessage;

pub struct SlurmExecutor {
    config: SlurmConfig,
    /// Program and leading arguments that start a worker on a node.
    worker_command: Vec<String>,
}

impl SlurmExecutor {
    pub fn new(worker_command: Vec<String>, config: SlurmConfig) -> Self {
        SlurmExecutor {
            config,
            worker_command,
        }
    }

    fn follow(&self, workdir: PathBuf, slurm_job: u64) -> Box<dyn Follow> {
        Box::new(SlurmFollow {
            messages: MessageFile::new(slurm::messages_file(&workdir, slurm_job)),
            workdir,
            slurm_job,
            poll: self.config.poll,
            requeue: self.config.requeue,
            pending: std::collections::VecDeque::new(),
            worker_finished: false,
            asked: None,
            ended: None,
        })
    }
}

fn handle(slurm_job: u64) -> ExecutorHandle {
    ExecutorHandle {
        executor: "slurm".into(),
        id: slurm_job.to_string(),
    }
}

fn slurm_id(handle: &ExecutorHandle) -> Result<u64> {
    handle
        .id
        .parse()
        .with_context(|| format!("{handle}: not a Slurm job id"))
}

/// `scancel` an attempt recorded with a Slurm handle.
pub fn stop_by_handle(handle: &ExecutorHandle) -> Result<String> {
    let id = slurm_id(handle)?;
    slurm::scancel(id)?;
    Ok(format!("cancelled Slurm job {id}"))
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn slots(&self) -> Vec<String> {
        vec!["slurm".into(); self.config.max_in_flight.max(1)]
    }

    fn placement(&self, job: &JobView, _slot: usize) -> Placement {
        let resources = self.config.resources(job.kind, job.resources);
        Placement {
            // Slurm hands the job its GPUs as the first visible ones.
            device: if resources.gpus.unwrap_or(0) > 0 {
                "cuda:0".into()
            } else {
                "cpu".into()
            },
            threads: resources.cpus.unwrap_or(1).max(1) as usize,
        }
    }

    fn start<'a>(&'a self, launch: Launch<'a>) -> BoxFuture<'a, Result<Started>> {
        Box::pin(async move {
            let job = launch.job;
            let threads = launch.placement.threads;
            let mut command: Vec<String> = self
                .worker_command
                .iter()
                .map(|a| slurm::sh_quote(a))
                .collect();
            command.push("--job-file".into());
            command.push(slurm::sh_quote(&launch.job_file.display().to_string()));
            command.push("--messages".into());
            command.push(format!(
                "{}/messages-\"$SLURM_JOB_ID\".jsonl",
                slurm::sh_quote(&launch.workdir.display().to_string())
            ));
            let script = launch.workdir.join("job.sh");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\n# herd job {} ({}), attempt {}\nexport RAYON_NUM_THREADS={threads} CANDLE_NUM_THREADS={threads}\nexec {}\n",
                    job.id,
                    job.name,
                    launch.attempt,
                    command.join(" ")
                ),
            )?;
            let name = slurm::job_name(job.id);
            let workdir = launch.workdir.clone();
            let (config, resources) = (
                self.config.clone(),
                self.config.resources(job.kind, job.resources),
            );
            let slurm_job = tokio::task::spawn_blocking(move || {
                // An attempt a daemon submitted but died before recording.
                slurm::scancel_by_name(&name)?;
                slurm::sbatch(&config, &name, resources, &workdir, &script)
            })
            .await??;
            Ok(Started {
                handle: handle(slurm_job),
                pid: None,
                follow: self.follow(launch.workdir, slurm_job),
            })
        })
    }

    fn survives_restart(&self) -> bool {
        true
    }

    fn reattach<'a>(
        &'a self,
        _job: &'a JobView,
        handle: &'a ExecutorHandle,
        workdir: PathBuf,
    ) -> BoxFuture<'a, Result<Box<dyn Follow>>> {
        Box::pin(async move { Ok(self.follow(workdir, slurm_id(handle)?)) })
    }

    fn probe<'a>(&'a self, data_dir: &'a Path) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let (config, worker, data) = (
                self.config.clone(),
                self.worker_command.clone(),
                data_dir.to_path_buf(),
            );
            let node = tokio::task::spawn_blocking(move || slurm::probe(&config, &worker, &data))
                .await??;
            Ok(Some(format!(
                "Slurm executor: the start-up probe ran on {node} and saw the data directory"
            )))
        })
    }
}

/// One Slurm job followed: its messages file by offset, its state from
/// `scontrol` every `poll` (more often once the worker said it finished).
struct SlurmFollow {
    messages: MessageFile,
    workdir: PathBuf,
    slurm_job: u64,
    poll: Duration,
    requeue: RequeuePolicy,
    /// Lines read but not yet handed out.
    pending: std::collections::VecDeque<String>,
    worker_finished: bool,
    asked: Option<tokio::time::Instant>,
    /// What the controller said once the job was no longer active.
    ended: Option<Option<slurm::JobInfo>>,
}

impl SlurmFollow {
    fn read(&mut self) -> Result<()> {
        for line in self.messages.read_lines()? {
            if let Ok(WorkerMessage::Done { .. } | WorkerMessage::Failed { .. }) =
                serde_json::from_str(&line)
            {
                self.worker_finished = true;
            }
            self.pending.push_back(line);
        }
        Ok(())
    }

    /// What the attempt's ending is, from what the controller said.
    fn ending(&self, info: Option<slurm::JobInfo>) -> Ending {
        let slurm_job = self.slurm_job;
        let said = slurm::tail(&slurm::output_file(&self.workdir, slurm_job), 2000);
        let with_output = |how: String| {
            if said.is_empty() {
                how
            } else {
                format!("{how}; its output: {said}")
            }
        };
        match info {
            None => Ending::Ended {
                ok: self.worker_finished,
                how: with_output(format!(
                    "Slurm no longer knows job {slurm_job} (purged after MinJobAge?) and its worker reported no result"
                )),
            },
            Some(info) => match info.state.as_str() {
                "COMPLETED" => Ending::Ended {
                    ok: true,
                    how: with_output(format!(
                        "{}, but its worker reported no result",
                        info.describe(slurm_job)
                    )),
                },
                "FAILED" => Ending::Ended {
                    ok: false,
                    how: with_output(info.describe(slurm_job)),
                },
                _ if info.is_node_failure() && self.requeue == RequeuePolicy::OnNodeFailure => {
                    Ending::Lost(info.describe(slurm_job))
                }
                "CANCELLED" => Ending::EndedBy(format!(
                    "{}: cancelled outside herd (scancel?)",
                    info.describe(slurm_job)
                )),
                _ => Ending::EndedBy(with_output(info.describe(slurm_job))),
            },
        }
    }
}

impl Follow for SlurmFollow {
    fn next(&mut self) -> BoxFuture<'_, Result<Next>> {
        Box::pin(async move {
            loop {
                if let Some(line) = self.pending.pop_front() {
                    return Ok(Next::Line(line));
                }
                if let Some(info) = self.ended.take() {
                    // What the worker wrote before it ended came first.
                    self.read()?;
                    if !self.pending.is_empty() {
                        self.ended = Some(info);
                        continue;
                    }
                    return Ok(Next::Ended(self.ending(info)));
                }
                self.read()?;
                if !self.pending.is_empty() {
                    continue;
                }
                // Once the worker has said how it ended, its Slurm job is
                // about to end too: ask more often.
                let poll = if self.worker_finished {
                    Duration::from_millis(100).min(self.poll)
                } else {
                    self.poll
                };
                if self.asked.is_none_or(|t| t.elapsed() >= poll) {
                    self.asked = Some(tokio::time::Instant::now());
                    let id = self.slurm_job;
                    match tokio::task::spawn_blocking(move || slurm::show_job(id)).await? {
                        Ok(Observed::Known(info)) if info.is_active() => {}
                        Ok(Observed::Known(info)) => {
                            self.ended = Some(Some(info));
                            continue;
                        }
                        Ok(Observed::Gone) => {
                            self.ended = Some(None);
                            continue;
                        }
                        // The controller may be restarting: ask again later.
                        Err(e) => tracing::warn!("Slurm job {id}: {e:#}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let id = self.slurm_job;
            match tokio::task::spawn_blocking(move || slurm::scancel(id)).await {
                Ok(Err(e)) => tracing::warn!("Slurm job {id}: {e:#}"),
                Err(e) => tracing::warn!("Slurm job {id}: {e}"),
                Ok(Ok(())) => {}
            }
        })
    }
}

/// A file a worker appends JSON lines to, read by offset: only whole lines
/// are taken; a line still being written waits for the next read.
struct MessageFile {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl MessageFile {
    fn new(path: PathBuf) -> Self {
        MessageFile {
            path,
            offset: 0,
            partial: vec![],
        }
    }

    fn read_lines(&mut self) -> Result<Vec<String>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            // Not created yet: the job has not started on its node.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![];
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(vec![]);
        };
        let rest = self.partial.split_off(end + 1);
        let whole = std::mem::replace(&mut self.partial, rest);
        Ok(String::from_utf8_lossy(&whole)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }
}
