//! The event envelope: what every record in the log looks like on disk.
//!
//! Records are self-describing JSON so that what is written today stays
//! readable after schemas change; each carries the sha256 of the record before
//! it, which makes the whole log a hash chain that `verify` can walk.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// An event as a caller proposes it, before the log gives it a place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Caller-chosen id (UUID v7); retrying an append with the same ids is a no-op.
    pub id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: serde_json::Value,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            causation_id: None,
            correlation_id: None,
        }
    }

    pub fn caused_by(mut self, causation: Option<Uuid>, correlation: Option<Uuid>) -> Self {
        self.causation_id = causation;
        self.correlation_id = correlation;
        self
    }
}

/// An event as stored: its place in the global log and in its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Global sequence, 1-based, gap-free.
    pub seq: u64,
    pub id: Uuid,
    pub stream: String,
    /// Version within the stream, 1-based, gap-free.
    pub version: u64,
    pub event_type: String,
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch, when the log accepted the event.
    pub timestamp_ms: u64,
    pub payload: serde_json::Value,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    /// Hex sha256 of the previous record's bytes ("" before the first event).
    pub prev_hash: String,
}

/// What the caller asserts about the stream's version before appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must exist (version >= 1).
    StreamExists,
    /// The stream must be at exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    pub(crate) fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::StreamExists => current > 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => write!(f, "any version"),
            ExpectedVersion::NoStream => write!(f, "no stream"),
            ExpectedVersion::StreamExists => write!(f, "an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The stream's version after the append.
    pub version: u64,
    /// True when every event id was already stored (an idempotent retry).
    pub duplicate: bool,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
