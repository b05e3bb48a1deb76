//! Getting things into the record: files streamed to the blob store, and
//! datasets, verifier programs, models and adapters imported from them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::{enc, BlobStored, Client, ClientError, Imported, NewCheckpoint, Result};

impl Client {
    /// Stream a file into the blob store; returns `{id, size, existed}`.
    pub fn upload_file(&self, path: &Path) -> Result<Value> {
        self.upload(path, "/blobs")
    }

    fn upload(&self, path: &Path, route: &str) -> Result<Value> {
        let io = |e| ClientError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let resp = self
            .req("POST", route)
            .set("Content-Length", &size.to_string())
            .send(file);
        Self::json(self.handle(resp)?)
    }

    /// Import a dataset of `kind` (preference, sft, prompts) from a JSONL
    /// file, or a Parquet file (read here into the same JSONL rows).
    pub fn import_dataset(&self, path: &Path, kind: &str, name: &str) -> Result<Imported> {
        let route = format!("/datasets?kind={}&name={}", enc(kind), enc(name));
        if crate::parquet::is_parquet(path) {
            let jsonl = crate::parquet::to_jsonl(path)?;
            let resp = self.req("POST", &route).send_bytes(&jsonl);
            return Self::typed(Self::json(self.handle(resp)?)?);
        }
        Self::typed(self.upload(path, &route)?)
    }

    /// Import a verifier program (any executable file; a `grpo` job runs it
    /// with JSON lines in and `{"reward": x}` lines out).
    pub fn import_verifier(&self, path: &Path, name: &str) -> Result<Imported> {
        Self::typed(self.upload(path, &format!("/verifiers?name={}", enc(name)))?)
    }

    /// Import a Hugging Face model directory (every regular file in it).
    pub fn import_model(&self, dir: &Path, name: &str) -> Result<Imported> {
        self.import_directory(dir, name, None)
    }

    /// Import a PEFT LoRA adapter directory as an adapter of the recorded
    /// checkpoint `base`.
    pub fn import_adapter(&self, dir: &Path, name: &str, base: &str) -> Result<Imported> {
        self.import_directory(dir, name, Some(base))
    }

    fn import_directory(&self, dir: &Path, name: &str, base: Option<&str>) -> Result<Imported> {
        let io = |e| ClientError::Io {
            path: dir.display().to_string(),
            source: e,
        };
        let mut files = BTreeMap::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for p in entries {
            let fname = p
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if fname.starts_with('.') {
                continue;
            }
            let info: BlobStored = Self::typed(self.upload_file(&p)?)?;
            files.insert(fname, info.id);
        }
        // The daemon judges the files it was sent; say which directory.
        let recorded = self
            .post(
                "/checkpoints",
                &NewCheckpoint {
                    name: name.into(),
                    files,
                    base: base.map(String::from),
                },
            )
            .map_err(|e| match e {
                ClientError::Api { status, message } => ClientError::Api {
                    status,
                    message: format!(
                        "{}: {}",
                        dir.display(),
                        message.trim_start_matches("field `files`: ")
                    ),
                },
                other => other,
            })?;
        Self::typed(recorded)
    }
}
