//! The one place that knows the storage engine is sled.
//!
//! sled 0.34 has had no release since 2021, so everything else in the store
//! talks to this narrow seam: keyed bytes, one atomic batch, one durable
//! flush. Changing the engine means rewriting this file only.
//!
//! Everything lives in one sled tree so that a batch spanning events, stream
//! indexes and the head pointer is a single atomic `apply_batch` (cross-tree
//! atomicity would need sled transactions, which take a process-wide lock).
//!
//! Key layout (all integers big-endian so that byte order is numeric order):
//!   `e` seq                 -> event record (JSON)
//!   `s` stream 0x00 version -> seq
//!   `h` stream              -> current stream version
//!   `i` event-uuid          -> seq
//!   `mhead`                 -> last seq (8 bytes) ++ hex sha256 of its record

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

pub(crate) struct Backend {
    db: sled::Db,
    /// sled's `flush` ends in `sync_file_range`, which does not survive a power
    /// cut; we `fdatasync` the data file ourselves after each flush.
    data_file: File,
    path: PathBuf,
}

const HEAD_KEY: &[u8] = b"mhead";

pub(crate) fn event_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 10);
    k.push(b's');
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(crate) fn stream_head_key(stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 1);
    k.push(b'h');
    k.extend_from_slice(stream.as_bytes());
    k
}

pub(crate) fn id_key(id: &uuid::Uuid) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'i';
    k[1..].copy_from_slice(id.as_bytes());
    k
}

fn u64_of(bytes: &[u8], what: &str) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            StoreError::Backend(format!("{what}: expected 8 bytes, found {}", bytes.len()))
        })?;
    Ok(u64::from_be_bytes(arr))
}

fn be(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// One atomic group of writes.
#[derive(Default)]
pub(crate) struct WriteBatch {
    inner: sled::Batch,
    pub(crate) len: usize,
}

impl WriteBatch {
    pub(crate) fn put(&mut self, key: &[u8], value: &[u8]) {
        self.inner.insert(key, value);
        self.len += 1;
    }
    pub(crate) fn set_head(&mut self, seq: u64, hash: &str) {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(hash.as_bytes());
        self.put(HEAD_KEY, &v);
    }
}

impl Backend {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| {
                StoreError::Backend(format!("opening sled database at {}: {e}", dir.display()))
            })?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|e| StoreError::io(&data_path, e))?;
        Ok(Backend {
            db,
            data_file,
            path: dir.to_path_buf(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// (last sequence, hex hash of its record); (0, "") for an empty log.
    pub(crate) fn head(&self) -> Result<(u64, String)> {
        match self.db.get(HEAD_KEY).map_err(be)? {
            None => Ok((0, String::new())),
            Some(v) => {
                let seq = u64_of(&v, "head pointer")?;
                let hash = std::str::from_utf8(&v[8..])
                    .map_err(|_| StoreError::Backend("head pointer hash is not UTF-8".into()))?
                    .to_string();
                Ok((seq, hash))
            }
        }
    }

    pub(crate) fn stream_version(&self, stream: &str) -> Result<u64> {
        match self.db.get(stream_head_key(stream)).map_err(be)? {
            None => Ok(0),
            Some(v) => u64_of(&v, "stream head"),
        }
    }

    pub(crate) fn seq_of_id(&self, id: &uuid::Uuid) -> Result<Option<u64>> {
        self.db
            .get(id_key(id))
            .map_err(be)?
            .map(|v| u64_of(&v, "event id index"))
            .transpose()
    }

    pub(crate) fn event_bytes(&self, seq: u64) -> Result<Option<sled::IVec>> {
        self.db.get(event_key(seq)).map_err(be)
    }

    /// Events with sequence >= `from`, in order.
    pub(crate) fn scan_events(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec)>> + '_ {
        self.db
            .range(event_key(from)..event_key(u64::MAX))
            .map(|r| {
                let (k, v) = r.map_err(be)?;
                Ok((u64_of(&k[1..], "event key")?, v))
            })
    }

    /// Sequence numbers of a stream's events with version >= `from`, in order.
    pub(crate) fn scan_stream(
        &self,
        stream: &str,
        from: u64,
    ) -> impl Iterator<Item = Result<u64>> + '_ {
        let start = stream_key(stream, from);
        let end = stream_key(stream, u64::MAX);
        self.db.range(start..=end).map(|r| {
            let (_, v) = r.map_err(be)?;
            u64_of(&v, "stream index")
        })
    }

    /// Names of every stream (sorted).
    pub(crate) fn streams(&self) -> impl Iterator<Item = Result<String>> + '_ {
        self.db.scan_prefix(b"h").map(|r| {
            let (k, _) = r.map_err(be)?;
            String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Backend("stream name is not UTF-8".into()))
        })
    }

    /// Apply atomically, then make it durable: sled flush plus our own fdatasync.
    pub(crate) fn commit(&self, batch: WriteBatch) -> Result<()> {
        self.db.apply_batch(batch.inner).map_err(be)?;
        self.db.flush().map_err(be)?;
        self.data_file
            .sync_data()
            .map_err(|e| StoreError::io(self.path.join("db"), e))?;
        Ok(())
    }

    /// Test hook: overwrite raw bytes (used to prove that `verify` notices).
    #[doc(hidden)]
    pub(crate) fn raw_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.insert(key, value).map_err(be)?;
        self.db.flush().map_err(be)?;
        Ok(())
    }
}
