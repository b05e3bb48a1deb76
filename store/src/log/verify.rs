//! Walking the whole log: every record decodes, the chain links, both
//! indexes point back at every record, the head pointer matches the end.
//! Opening checks only the chain (recovery.rs); `verify` checks everything.

use std::collections::HashMap;

use uuid::Uuid;

use super::{decode, EventLog};
use crate::backend::Run;
use crate::error::{Result, StoreError};
use crate::event::sha256_hex;

/// What `verify` found when the chain is intact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainReport {
    pub events: u64,
    pub last_hash: String,
}

impl EventLog {
    /// Walk the whole chain: every record decodes, sequences are gap-free,
    /// each record names the hash of the one before, the stream index and
    /// the id index point back at it, and the head pointer matches the last
    /// record.
    pub fn verify_chain(&self) -> Result<ChainReport> {
        let backend = &self.shared.backend;
        let head = backend.head()?;
        let mut prev_hash = String::new();
        let mut last = 0u64;
        // The run last seen per stream: most records fall inside it.
        let mut runs: HashMap<String, Run> = HashMap::new();
        // The id bucket last loaded: consecutive v7 ids share one.
        let mut bucket: ([u8; 6], HashMap<Uuid, u64>) = ([0; 6], HashMap::new());
        let mut bucket_loaded = false;
        if head.seq > 0 {
            backend.for_each_record(1, head.seq, |seq, _, bytes| {
                let rec = decode(seq, bytes)?;
                if rec.prev_hash != prev_hash {
                    // Nothing vouches for the record before: name it, as opening does.
                    return Err(StoreError::BrokenChain {
                        seq: seq.saturating_sub(1).max(1),
                        reason: format!(
                            "the record hashes to {prev_hash:?}, but record {seq} names {:?} as its hash: it changed after it was written",
                            rec.prev_hash
                        ),
                    });
                }
                let covers = |r: &Run| {
                    r.first_version <= rec.version && rec.version < r.first_version + r.count
                };
                let run = match runs.get(&rec.stream).copied().filter(covers) {
                    Some(r) => Some(r),
                    None => backend
                        .runs_from(&rec.stream, rec.version)
                        .next()
                        .transpose()?
                        .filter(covers),
                };
                let indexed = run.map(|r| r.first_seq + (rec.version - r.first_version));
                if indexed != Some(seq) {
                    return Err(StoreError::BrokenChain {
                        seq,
                        reason: format!(
                            "stream index of `{}` v{} points at {:?}",
                            rec.stream, rec.version, indexed
                        ),
                    });
                }
                if let Some(r) = run {
                    runs.insert(rec.stream, r);
                }
                // Idempotent retries depend on the id index: it must know
                // every event, at its sequence.
                let prefix: [u8; 6] = rec.id.as_bytes()[..6].try_into().expect("16 bytes");
                if !bucket_loaded || bucket.0 != prefix {
                    bucket = (prefix, backend.ids_like(&rec.id)?.into_iter().collect());
                    bucket_loaded = true;
                }
                if bucket.1.get(&rec.id) != Some(&seq) {
                    return Err(StoreError::BrokenChain {
                        seq,
                        reason: format!(
                            "event id index has {} at {:?}",
                            rec.id,
                            bucket.1.get(&rec.id)
                        ),
                    });
                }
                prev_hash = sha256_hex(bytes);
                last = seq;
                Ok(true)
            })?;
        }
        if last != head.seq || prev_hash != head.hash {
            return Err(StoreError::BrokenChain {
                seq: last,
                reason: format!(
                    "head pointer says seq {} hash {}, records end at {last} hash {prev_hash}",
                    head.seq, head.hash
                ),
            });
        }
        Ok(ChainReport {
            events: last,
            last_hash: prev_hash,
        })
    }
}
