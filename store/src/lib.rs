//! herd's store: the immutable record of every post-training round.
//!
//! * [`EventLog`]: append-only, hash-chained, group-committed event log (sled).
//! * [`BlobStore`]: content-addressed files for datasets and checkpoints.
//!
//! The store knows nothing of training or of herd's event types (those live in
//! herd-core): it keeps records and bytes, verifiably, and answers queries.

mod backend;
pub mod blob;
pub mod error;
pub mod event;
pub mod log;
pub mod recovery;

use std::path::Path;

pub use blob::{BlobId, BlobInfo, BlobStore, Tree, TreeEntry};
pub use error::{Result, StoreError};
pub use event::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent};
pub use log::{ChainReport, EventLog, Subscription};
pub use recovery::{repair, RecoveryReport, RepairReport};

/// The event log and the blob store of one data directory.
#[derive(Clone)]
pub struct Store {
    pub log: EventLog,
    pub blobs: BlobStore,
}

/// What a full verification found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub chain: ChainReport,
    pub blobs: blob::BlobReport,
}

impl Store {
    /// Open (or create) `dir/log` and `dir/blobs`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Store {
            log: EventLog::open(&dir.join("log"))?,
            blobs: BlobStore::open(&dir.join("blobs"))?,
        })
    }

    /// Walk the hash chain and re-hash every blob; the first fault is the error.
    pub fn verify(&self) -> Result<VerifyReport> {
        Ok(VerifyReport {
            chain: self.log.verify_chain()?,
            blobs: self.blobs.verify_all()?,
        })
    }
}
