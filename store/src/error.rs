//! Every way the store can fail, as one typed error whose message says what
//! and where (sequence number, stream, blob id, file).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict on stream `{stream}`: expected {expected}, but the stream is at version {current}")]
    Conflict {
        stream: String,
        expected: String,
        current: u64,
    },

    #[error("append to stream `{stream}` mixes event ids already stored ({stored} of {total}) with new ones; retry the original batch unchanged")]
    PartialDuplicate {
        stream: String,
        stored: usize,
        total: usize,
    },

    #[error("invalid append: {0}")]
    Invalid(String),

    #[error("corrupt event record at sequence {seq}: {reason}")]
    CorruptEvent { seq: u64, reason: String },

    /// Found when the log is opened: the records from `seq` on can't be
    /// trusted. Nothing is changed; `herdd repair` sets them aside.
    #[error("the event log is damaged at sequence {seq} (byte {offset} of log/events.jsonl): {reason}. \
             Nothing was changed. `herdd repair --data-dir DATA` says what repairing would lose; \
             with --accept-loss it moves the records from there on into a quarantine file \
             (nothing is deleted), rebuilds the index and records the loss in the history")]
    Damaged {
        seq: u64,
        offset: u64,
        reason: String,
    },

    /// An append could not be written because the disk is full. Nothing of
    /// it was recorded; the log takes writes again once space returns.
    #[error("no space left on the disk holding the event log: nothing of this append was recorded (retry when space returns)")]
    NoSpace,

    #[error("broken hash chain at sequence {seq}: {reason}")]
    BrokenChain { seq: u64, reason: String },

    #[error("blob {id} not found")]
    BlobNotFound { id: String },

    #[error("blob {id} is corrupt: content hashes to {actual} ({path})")]
    BlobCorrupt {
        id: String,
        actual: String,
        path: PathBuf,
    },

    #[error("invalid blob id `{0}`: expected 64 lowercase hex characters (sha256)")]
    BadBlobId(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("storage backend error: {0}")]
    Backend(String),

    #[error("the event log is closed")]
    Closed,

    #[error("the event log stopped accepting writes after an earlier durability failure: {0}")]
    Poisoned(String),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
