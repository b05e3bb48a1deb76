//! Jobs run in their own process, so a crash, OOM or cancel never takes the
//! daemon down. The daemon writes a job file, starts `herdd worker --job-file
//! F`, and reads one JSON message per line from the worker's stdout. Outputs
//! go straight into the blob store (safe for concurrent writers); the daemon
//! alone writes the event log.

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

struct StdoutSink {
    blobs: Option<herd_store::BlobStore>,
    out: std::io::Stdout,
}

impl StdoutSink {
    fn send(&mut self, m: &WorkerMessage) -> Result<()> {
        let mut line = serde_json::to_string(m)?;
        line.push('\n');
        let mut lock = self.out.lock();
        // A closed pipe means the daemon is gone: stop the job.
        lock.write_all(line.as_bytes())
            .context("daemon went away (stdout closed)")?;
        lock.flush().context("daemon went away (stdout closed)")?;
        Ok(())
    }
}

impl Sink for StdoutSink {
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

/// `herdd worker --job-file PATH`: run one job, report on stdout, exit 0 on success.
pub fn main(job_file: &Path) -> i32 {
    herd_engine::device::tune_allocator();
    let mut sink = StdoutSink {
        blobs: None,
        out: std::io::stdout(),
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
