//! Jobs run in their own process, so a crash, OOM or cancel never takes the
//! daemon down. The daemon writes a job file, starts `herdd worker --job-file
//! F`, and reads one JSON message per line: from the worker's stdout when
//! the worker is its child (local executor), or, with `--messages FILE`,
//! from a file the worker appends to and the daemon follows (Slurm: the
//! worker runs on another node and outlives a daemon restart; each line is
//! synced before the next, so what the daemon read is never taken back).
//! Outputs go straight into the blob store (safe for concurrent writers);
//! the daemon alone writes the event log.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{self, JobContext, JobKind, Sink};

/// Everything a worker needs, written by the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobFile {
    pub job: uuid::Uuid,
    pub kind: JobKind,
    pub hyperparameters: Value,
    pub seed: u64,
    pub inputs: BTreeMap<String, PathBuf>,
    pub workdir: PathBuf,
    pub blobs_dir: PathBuf,
    pub device: String,
    pub threads: usize,
}

/// One line on the worker's stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum WorkerMessage {
    Metrics {
        step: u64,
        points: Vec<(String, f64)>,
    },
    Progress {
        done: u64,
        total: u64,
    },
    Output {
        name: String,
        artifact: herd_core::ArtifactKind,
        hash: String,
        summary: Value,
    },
    Note {
        message: String,
    },
    Done {
        summary: Value,
    },
    Failed {
        reason: String,
    },
}

/// Where a worker's messages go.
enum Channel {
    /// The daemon's pipe: a closed pipe means the daemon is gone.
    Stdout(std::io::Stdout),
    /// A file the daemon follows by offset.
    File(std::fs::File),
}

struct MessageSink {
    blobs: Option<herd_store::BlobStore>,
    channel: Channel,
}

impl MessageSink {
    fn send(&mut self, m: &WorkerMessage) -> Result<()> {
        let mut line = serde_json::to_string(m)?;
        line.push('\n');
        match &mut self.channel {
            Channel::Stdout(out) => {
                let mut lock = out.lock();
                // A closed pipe means the daemon is gone: stop the job.
                lock.write_all(line.as_bytes())
                    .context("daemon went away (stdout closed)")?;
                lock.flush().context("daemon went away (stdout closed)")?;
            }
            Channel::File(f) => {
                // One write per line (O_APPEND), synced: a reader on another
                // node sees whole lines, and a line it read stays.
                f.write_all(line.as_bytes())
                    .context("writing the messages file")?;
                f.sync_data().context("syncing the messages file")?;
            }
        }
        Ok(())
    }
}

impl Sink for MessageSink {
    fn metrics(&mut self, step: u64, points: &[(String, f64)]) -> Result<()> {
        self.send(&WorkerMessage::Metrics {
            step,
            points: points.to_vec(),
        })
    }
    fn progress(&mut self, done: u64, total: u64) {
        let _ = self.send(&WorkerMessage::Progress { done, total });
    }
    fn output(
        &mut self,
        name: &str,
        artifact: herd_core::ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<String> {
        let blobs = self.blobs.as_ref().context("worker has no blob store")?;
        let hash = jobs::store_output(blobs, path)?;
        self.send(&WorkerMessage::Output {
            name: name.into(),
            artifact,
            hash: hash.clone(),
            summary,
        })?;
        Ok(hash)
    }
    fn note(&mut self, message: &str) {
        let _ = self.send(&WorkerMessage::Note {
            message: message.into(),
        });
    }
}

/// `herdd worker --job-file PATH [--messages FILE]`: run one job, report on
/// stdout (or append to FILE), exit 0 on success.
pub fn main(job_file: &Path, messages: Option<&Path>) -> i32 {
    herd_engine::device::tune_allocator();
    let channel = match messages {
        None => Channel::Stdout(std::io::stdout()),
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Channel::File(f),
            Err(e) => {
                eprintln!("herdd worker: opening {}: {e}", path.display());
                return 1;
            }
        },
    };
    let mut sink = MessageSink {
        blobs: None,
        channel,
    };
    let result = (|| -> Result<Value> {
        let text = std::fs::read_to_string(job_file)
            .with_context(|| format!("reading job file {}", job_file.display()))?;
        let jf: JobFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing job file {}", job_file.display()))?;
        herd_engine::device::set_cpu_threads(jf.threads);
        sink.blobs = Some(herd_store::BlobStore::open(&jf.blobs_dir)?);
        let device = herd_engine::device::select(&jf.device)?;
        let mut ctx = JobContext {
            kind: jf.kind,
            hyperparameters: jf.hyperparameters,
            seed: jf.seed,
            inputs: jf.inputs,
            workdir: jf.workdir,
            device,
            sink: &mut sink,
        };
        jobs::run(&mut ctx)
    })();
    match result {
        Ok(summary) => {
            let _ = sink.send(&WorkerMessage::Done { summary });
            0
        }
        Err(e) => {
            let _ = sink.send(&WorkerMessage::Failed {
                reason: format!("{e:#}"),
            });
            1
        }
    }
}
