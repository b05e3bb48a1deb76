//! herd's shared vocabulary, one definition for the daemon and the client.
//!
//! Why a crate of its own: the store is a generic log and blob store (it
//! knows nothing of jobs), the client speaks only HTTP (it must not pull in
//! sled or candle), and both sides of the API must agree on every type.
//! So the typed events, the views folded from them and the words both sides
//! use live here, with nothing but serde and uuid underneath.
//!
//! * [`model`]: the typed events (`HerdEvent`) and the views folded from
//!   them (`Projection`: experiments, rounds, jobs and their rows,
//!   artifacts, lineage; metric points are indexed by the daemon).
//! * [`vocab`]: job kinds, artifact kinds, blob hashes and input references,
//!   each parsed once from its text.
//! * [`wire`]: the request and response bodies of the HTTP API.
//! * [`number`]: metric values in JSON, NaN and infinities included.

pub mod model;
pub mod number;
pub mod vocab;
pub mod wire;

pub use model::{HerdEvent, JobStatus, Projection};
pub use vocab::{ArtifactKind, BlobHash, InputRef, JobKind, Resources};
