//! Content-addressed blob store for datasets and checkpoints.
//!
//! A blob's id is the sha256 of its bytes. Writes stream through a hasher into
//! a temp file that is fsynced and then renamed into place, so a crash leaves
//! either the whole blob or nothing, and the same content is stored once.
//! Reads verify the hash as they go: a flipped byte is an error, never data.
//!
//! A directory (a Hugging Face checkpoint: config.json, model.safetensors,
//! tokenizer.json) is stored as a *tree*: a small JSON manifest blob naming the
//! blob of each file. The tree's id is the id of the manifest.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, StoreError};

/// A blob's id: 64 lowercase hex characters of its sha256.
pub type BlobId = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub id: BlobId,
    pub size: u64,
    /// True when this content was already stored (and intact).
    pub existed: bool,
    /// True when a stored copy was corrupt and these bytes replaced it.
    #[serde(default)]
    pub repaired: bool,
}

/// One file of a stored directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub name: String,
    pub blob: BlobId,
    pub size: u64,
}

/// The manifest of a stored directory, files sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub herd_tree: u32,
    pub files: Vec<TreeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobReport {
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Clone)]
pub struct BlobStore {
    root: PathBuf,
}

pub fn validate_id(id: &str) -> Result<()> {
    if id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::BadBlobId(id.chars().take(80).collect()))
    }
}

impl BlobStore {
    pub fn open(root: &Path) -> Result<Self> {
        for d in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&d).map_err(|e| StoreError::io(&d, e))?;
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    /// Where a blob lives (whether or not it exists).
    pub fn path_of(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        Ok(self.root.join("sha256").join(&id[..2]).join(&id[2..]))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.path_of(id).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Stream `reader` into the store; never holds the whole blob in memory.
    pub fn put_reader(&self, mut reader: impl Read) -> Result<BlobInfo> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile_in(&tmp_dir)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io(&tmp.path, e)),
            };
            hasher.update(&buf[..n]);
            tmp.file
                .write_all(&buf[..n])
                .map_err(|e| StoreError::io(&tmp.path, e))?;
            size += n as u64;
        }
        tmp.file
            .sync_all()
            .map_err(|e| StoreError::io(&tmp.path, e))?;
        let id = hex::encode(hasher.finalize());
        let dest = self.path_of(&id)?;
        // The bytes just hashed are right by construction: a stored copy
        // that no longer hashes to its name is replaced by them (re-uploading
        // is how a corrupt blob is repaired).
        let repaired = dest.is_file() && self.verify(&id).is_err();
        if dest.is_file() && !repaired {
            return Ok(BlobInfo {
                id,
                size,
                existed: true,
                repaired: false,
            });
        }
        let parent = dest.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        fs::rename(&tmp.path, &dest).map_err(|e| StoreError::io(&dest, e))?;
        tmp.kept = true;
        // Make the rename itself durable.
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(BlobInfo {
            id,
            size,
            existed: false,
            repaired,
        })
    }

    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobInfo> {
        self.put_reader(bytes)
    }

    pub fn put_file(&self, path: &Path) -> Result<BlobInfo> {
        let f = File::open(path).map_err(|e| StoreError::io(path, e))?;
        self.put_reader(BufReader::new(f))
    }

    /// A reader that checks the hash when it reaches the end.
    pub fn reader(&self, id: &str) -> Result<VerifyingReader> {
        let path = self.path_of(id)?;
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobNotFound { id: id.to_string() },
            _ => StoreError::io(&path, e),
        })?;
        Ok(VerifyingReader {
            inner: BufReader::new(file),
            hasher: Sha256::new(),
            id: id.to_string(),
            path,
            done: false,
        })
    }

    /// The whole blob, verified. For small blobs (manifests, datasets).
    pub fn read(&self, id: &str) -> Result<Vec<u8>> {
        let mut r = self.reader(id)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| r.to_store_error(e))?;
        Ok(out)
    }

    /// Re-hash one blob; returns its size.
    pub fn verify(&self, id: &str) -> Result<u64> {
        let mut r = self.reader(id)?;
        io::copy(&mut r, &mut io::sink()).map_err(|e| r.to_store_error(e))
    }

    /// Re-hash every blob; the first bad one is the error.
    pub fn verify_all(&self) -> Result<BlobReport> {
        let mut report = BlobReport { blobs: 0, bytes: 0 };
        let base = self.root.join("sha256");
        let mut dirs: Vec<_> = read_dir_sorted(&base)?;
        dirs.retain(|p| p.is_dir());
        for d in dirs {
            for f in read_dir_sorted(&d)? {
                let prefix = d.file_name().and_then(|s| s.to_str()).unwrap_or_default();
                let rest = f.file_name().and_then(|s| s.to_str()).unwrap_or_default();
                let id = format!("{prefix}{rest}");
                report.bytes += self.verify(&id)?;
                report.blobs += 1;
            }
        }
        Ok(report)
    }

    /// Store every regular file directly in `dir` (not recursing) as a tree.
    pub fn put_dir(&self, dir: &Path) -> Result<BlobInfo> {
        let mut files = Vec::new();
        for path in read_dir_sorted(dir)? {
            if path.is_file() {
                let name = path
                    .file_name()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                files.push((name, path));
            }
        }
        if files.is_empty() {
            return Err(StoreError::io(
                dir,
                io::Error::new(io::ErrorKind::NotFound, "directory holds no files"),
            ));
        }
        let mut entries = Vec::new();
        for (name, path) in files {
            let info = self.put_file(&path)?;
            entries.push(TreeEntry {
                name,
                blob: info.id,
                size: info.size,
            });
        }
        self.put_tree(entries)
    }

    pub fn put_tree(&self, mut files: Vec<TreeEntry>) -> Result<BlobInfo> {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = Tree {
            herd_tree: 1,
            files,
        };
        self.put_bytes(&serde_json::to_vec(&tree).expect("tree serializes"))
    }

    /// Read a tree manifest; errors if the blob is not one.
    pub fn tree(&self, id: &str) -> Result<Tree> {
        let bytes = self.read(id)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Invalid(format!("blob {id} is not a directory tree: {e}")))
    }

    /// Write a tree's files into `dest` (created), each verified as copied.
    /// Check that `dir` (a materialized copy of tree `id`) still holds
    /// exactly the tree's bytes: every file re-hashed, none missing.
    pub fn check_materialized(&self, id: &str, dir: &Path) -> Result<()> {
        let tree = self.tree(id)?;
        for entry in &tree.files {
            let path = dir.join(&entry.name);
            let mut f = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
            let mut hasher = Sha256::new();
            io::copy(&mut f, &mut hasher).map_err(|e| StoreError::io(&path, e))?;
            let actual = hex::encode(hasher.finalize());
            if actual != entry.blob {
                return Err(StoreError::BlobCorrupt {
                    id: entry.blob.clone(),
                    actual,
                    path,
                });
            }
        }
        Ok(())
    }

    pub fn materialize(&self, id: &str, dest: &Path) -> Result<Tree> {
        let tree = self.tree(id)?;
        fs::create_dir_all(dest).map_err(|e| StoreError::io(dest, e))?;
        for entry in &tree.files {
            if entry.name.contains('/') || entry.name.contains('\\') || entry.name.starts_with('.')
            {
                return Err(StoreError::Invalid(format!(
                    "tree {id} has an unsafe file name {:?}",
                    entry.name
                )));
            }
            let target = dest.join(&entry.name);
            let mut r = self.reader(&entry.blob)?;
            let mut out = File::create(&target).map_err(|e| StoreError::io(&target, e))?;
            io::copy(&mut r, &mut out).map_err(|e| r.to_store_error(e))?;
        }
        Ok(tree)
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| StoreError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

struct TempFile {
    file: File,
    path: PathBuf,
    kept: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn tempfile_in(dir: &Path) -> Result<TempFile> {
    let path = dir.join(format!("{}.part", uuid::Uuid::now_v7()));
    let file = File::create(&path).map_err(|e| StoreError::io(&path, e))?;
    Ok(TempFile {
        file,
        path,
        kept: false,
    })
}

/// Reads a blob and fails at the end if its bytes do not hash to its id.
pub struct VerifyingReader {
    inner: BufReader<File>,
    hasher: Sha256,
    id: String,
    path: PathBuf,
    done: bool,
}

impl VerifyingReader {
    fn to_store_error(&self, e: io::Error) -> StoreError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<CorruptBlob>())
        {
            Some(c) => StoreError::BlobCorrupt {
                id: self.id.clone(),
                actual: c.0.clone(),
                path: self.path.clone(),
            },
            None => StoreError::io(&self.path, e),
        }
    }
}

#[derive(Debug)]
struct CorruptBlob(String);
impl std::fmt::Display for CorruptBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blob content hashes to {}", self.0)
    }
}
impl std::error::Error for CorruptBlob {}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
        } else if !buf.is_empty() && !self.done {
            self.done = true;
            let actual = hex::encode(self.hasher.clone().finalize());
            if actual != self.id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    CorruptBlob(actual),
                ));
            }
        }
        Ok(n)
    }
}
