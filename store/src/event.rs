//! The event envelope: what every record in the log looks like on disk.
//!
//! Records are self-describing JSON so that what is written today stays
//! readable after schemas change; each carries the sha256 of the record before
//! it, which makes the whole log a hash chain that `verify` can walk.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// An event as a caller proposes it, before the log gives it a place.
///
/// The payload is JSON text: the store keeps it as given (the caller
/// serializes it, on its own thread, before the append).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEvent {
    /// Caller-chosen id (UUID v7); retrying an append with the same ids is a no-op.
    pub id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Box<RawValue>,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
}

impl NewEvent {
    /// An event with a fresh UUID v7 and schema version 1.
    pub fn new(event_type: impl Into<String>, payload: serde_json::Value) -> Self {
        let payload =
            serde_json::value::to_raw_value(&payload).expect("a JSON value always serializes");
        Self::from_raw(event_type, payload)
    }

    pub fn from_raw(event_type: impl Into<String>, payload: Box<RawValue>) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            causation_id: None,
            correlation_id: None,
        }
    }
}

impl PartialEq for NewEvent {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.event_type == other.event_type
            && self.schema_version == other.schema_version
            && self.payload.get() == other.payload.get()
            && self.causation_id == other.causation_id
            && self.correlation_id == other.correlation_id
    }
}

/// An event as stored: its place in the global log and in its stream.
///
/// The payload stays the JSON text it was stored as until someone asks for
/// it: replaying the log does not build a tree for every event.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub payload: Box<RawValue>,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    /// Hex sha256 of the previous record's bytes ("" before the first event).
    pub prev_hash: String,
}

impl RecordedEvent {
    /// The payload parsed into a JSON tree.
    pub fn payload_value(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(self.payload.get())
    }
}

impl PartialEq for RecordedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.id == other.id
            && self.stream == other.stream
            && self.version == other.version
            && self.event_type == other.event_type
            && self.schema_version == other.schema_version
            && self.timestamp_ms == other.timestamp_ms
            && self.payload.get() == other.payload.get()
            && self.causation_id == other.causation_id
            && self.correlation_id == other.correlation_id
            && self.prev_hash == other.prev_hash
    }
}

/// The fields of a record as the writer has them. `stream_json` and
/// `event_type_json` are already JSON strings (quoted and escaped): the
/// writer escapes them once per append, not once per event.
pub(crate) struct RecordParts<'a> {
    pub seq: u64,
    pub id: &'a Uuid,
    pub stream_json: &'a [u8],
    pub version: u64,
    pub event_type_json: &'a [u8],
    pub schema_version: u32,
    pub timestamp_ms: u64,
    pub payload: &'a RawValue,
    pub causation_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    pub prev_hash: &'a str,
}

/// Append a record's stored form (compact JSON, the fields of
/// [`RecordedEvent`] in order) to `out`. Written by hand because it is the
/// writer thread's inner loop; `stored_form_decodes_to_the_same_record`
/// checks it against serde.
pub(crate) fn write_record(out: &mut Vec<u8>, r: &RecordParts) {
    use std::io::Write;
    fn uuid(out: &mut Vec<u8>, id: Option<Uuid>) {
        match id {
            None => out.extend_from_slice(b"null"),
            Some(id) => {
                out.push(b'"');
                out.extend_from_slice(
                    id.hyphenated()
                        .encode_lower(&mut Uuid::encode_buffer())
                        .as_bytes(),
                );
                out.push(b'"');
            }
        }
    }
    let io = "writing to memory cannot fail";
    write!(out, "{{\"seq\":{},\"id\":", r.seq).expect(io);
    uuid(out, Some(*r.id));
    out.extend_from_slice(b",\"stream\":");
    out.extend_from_slice(r.stream_json);
    write!(out, ",\"version\":{},\"event_type\":", r.version).expect(io);
    out.extend_from_slice(r.event_type_json);
    write!(
        out,
        ",\"schema_version\":{},\"timestamp_ms\":{},\"payload\":",
        r.schema_version, r.timestamp_ms
    )
    .expect(io);
    out.extend_from_slice(r.payload.get().as_bytes());
    out.extend_from_slice(b",\"causation_id\":");
    uuid(out, r.causation_id);
    out.extend_from_slice(b",\"correlation_id\":");
    uuid(out, r.correlation_id);
    out.extend_from_slice(b",\"prev_hash\":");
    // Hex digits need no escaping.
    out.push(b'"');
    out.extend_from_slice(r.prev_hash.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Deepest nesting of arrays and objects an event payload may have. serde
/// refuses to read past 128 levels, and a record wraps its payload in one
/// more: whatever the log accepts, every reader must be able to read.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Whether JSON text nests `[` and `{` deeper than `limit` (strings
/// skipped): the depth reached past the limit, or None. Counting openers
/// (vectorized) settles most texts; only one with more openers than the
/// limit is walked, and the walk stops once past it.
pub fn json_deeper_than(json: &[u8], limit: usize) -> Option<usize> {
    let openers = json.iter().filter(|&&b| b == b'{' || b == b'[').count();
    if openers <= limit {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
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
    let mut buf = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(bytes), &mut buf).expect("64 hex digits for 32 bytes");
    String::from_utf8(buf.to_vec()).expect("hex is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_decodes_to_the_same_record() {
        let payload = serde_json::value::to_raw_value(
            &serde_json::json!({"text": "line\nbreak \"quoted\" \u{1F600}", "x": [1.5, null]}),
        )
        .unwrap();
        for (stream, event_type, causation) in [
            ("plain", "Tick", None),
            (
                "we\"ird\\name\u{0001}é",
                "Type \"quoted\"",
                Some(Uuid::now_v7()),
            ),
        ] {
            let id = Uuid::now_v7();
            let mut out = Vec::new();
            write_record(
                &mut out,
                &RecordParts {
                    seq: 7,
                    id: &id,
                    stream_json: &serde_json::to_vec(stream).unwrap(),
                    version: 3,
                    event_type_json: &serde_json::to_vec(event_type).unwrap(),
                    schema_version: 2,
                    timestamp_ms: 1_700_000_000_000,
                    payload: &payload,
                    causation_id: causation,
                    correlation_id: None,
                    prev_hash: &sha256_hex(b"x"),
                },
            );
            assert!(!out.contains(&b'\n'), "a record must stay on one line");
            let rec: RecordedEvent = serde_json::from_slice(&out).unwrap();
            let want = RecordedEvent {
                seq: 7,
                id,
                stream: stream.into(),
                version: 3,
                event_type: event_type.into(),
                schema_version: 2,
                timestamp_ms: 1_700_000_000_000,
                payload: payload.clone(),
                causation_id: causation,
                correlation_id: None,
                prev_hash: hex::encode(Sha256::digest(b"x")),
            };
            assert_eq!(rec, want);
            // Same bytes as serde would write.
            assert_eq!(out, serde_json::to_vec(&want).unwrap());
        }
    }
}
