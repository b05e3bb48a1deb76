//! Where a running job reports: metrics, progress, outputs, notes. The
//! worker's sink sends JSON lines to the daemon; `MemorySink` keeps
//! everything in memory for in-process runs and tests.

use std::path::Path;

use anyhow::Result;
use herd_core::ArtifactKind;
use serde_json::Value;

/// Where a running job reports.
pub trait Sink {
    /// Metrics of one step (computed with the weights before its update).
    fn metrics(&mut self, step: u64, points: &[(String, f64)]) -> Result<()>;
    fn progress(&mut self, done: u64, total: u64);
    /// Record an output (a checkpoint directory or a dataset file); returns its hash.
    fn output(
        &mut self,
        name: &str,
        artifact: ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<String>;
    fn note(&mut self, message: &str);
}

/// A sink that keeps everything in memory and hashes outputs with the blob
/// store's rules (tests, the in-process runner).
pub struct MemorySink {
    pub blobs: herd_store::BlobStore,
    pub metrics: Vec<(u64, Vec<(String, f64)>)>,
    pub outputs: Vec<(String, ArtifactKind, String, Value)>,
    pub notes: Vec<String>,
}

impl MemorySink {
    pub fn new(blobs: herd_store::BlobStore) -> Self {
        MemorySink {
            blobs,
            metrics: vec![],
            outputs: vec![],
            notes: vec![],
        }
    }
    /// The values of one metric, in step order.
    pub fn series(&self, name: &str) -> Vec<f64> {
        self.metrics
            .iter()
            .flat_map(|(_, p)| p.iter().filter(|(n, _)| n == name).map(|(_, v)| *v))
            .collect()
    }
    pub fn output_hash(&self, name: &str) -> Option<&str> {
        self.outputs
            .iter()
            .find(|o| o.0 == name)
            .map(|o| o.2.as_str())
    }
}

pub fn store_output(blobs: &herd_store::BlobStore, path: &Path) -> Result<String> {
    Ok(if path.is_dir() {
        blobs.put_dir(path)?.id
    } else {
        blobs.put_file(path)?.id
    })
}

impl Sink for MemorySink {
    fn metrics(&mut self, step: u64, points: &[(String, f64)]) -> Result<()> {
        self.metrics.push((step, points.to_vec()));
        Ok(())
    }
    fn progress(&mut self, _done: u64, _total: u64) {}
    fn output(
        &mut self,
        name: &str,
        artifact: ArtifactKind,
        path: &Path,
        summary: Value,
    ) -> Result<String> {
        let hash = store_output(&self.blobs, path)?;
        self.outputs
            .push((name.to_string(), artifact, hash.clone(), summary));
        Ok(hash)
    }
    fn note(&mut self, message: &str) {
        self.notes.push(message.to_string());
    }
}
