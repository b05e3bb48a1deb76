//! The bodies of the HTTP API, defined once: the daemon reads every request
//! body (and the structured queries) with these types and writes its
//! responses with them, the client the other way round, so a field renamed
//! on one side cannot drift from the other. (Views the API returns as they
//! are — experiments, rounds, artifacts, lineage — are the `model` types
//! themselves; small acknowledgements such as `{"ok": true}` stay inline.)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::{ArtifactView, ExperimentView, JobStatus, JobView, RoundView};
use crate::vocab::{ArtifactKind, InputRef, JobKind};

/// `POST /jobs`: what to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub kind: JobKind,
    #[serde(default, deserialize_with = "inputs_by_name")]
    pub inputs: BTreeMap<String, InputRef>,
    /// Over the kind's defaults; the answer says the effective set.
    #[serde(default)]
    pub hyperparameters: Value,
    #[serde(default)]
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub depends_on: Vec<Uuid>,
    /// What the job asks of a cluster executor, over the daemon's defaults
    /// for its kind (ignored by the local executor).
    #[serde(default, skip_serializing_if = "crate::Resources::is_empty")]
    pub resources: crate::Resources,
}

impl JobRequest {
    /// A request for `kind` with no inputs, default hyperparameters, seed 0.
    pub fn new(kind: JobKind) -> Self {
        JobRequest {
            kind,
            inputs: BTreeMap::new(),
            hyperparameters: Value::Object(Default::default()),
            seed: 0,
            experiment: None,
            name: None,
            priority: 0,
            depends_on: vec![],
            resources: Default::default(),
        }
    }
}

/// Input references, each error naming its input.
fn inputs_by_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, InputRef>, D::Error> {
    BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(name, text)| {
            text.parse()
                .map(|r| (name.clone(), r))
                .map_err(|e| serde::de::Error::custom(format!("input `{name}`: {e}")))
        })
        .collect()
}

/// `201` answer to `POST /jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmitted {
    pub id: Uuid,
    pub effective_hyperparameters: Value,
}

/// `GET /jobs` query: history filters and sort.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<Uuid>,
    /// Comma-separated job ids: only these (a compare's jobs, one request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<String>,
    /// Comma-separated conditions: `lr<1e-4`, `metric.loss<=2`, `hp.beta=0.1`.
    #[serde(rename = "where", default, skip_serializing_if = "Option::is_none")]
    pub where_: Option<String>,
    /// A field to sort by (`submitted`, `hp.X`, `metric.X`), `-` for descending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<String>,
    /// At most this many jobs (and never more than [`MAX_JOBS_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Skip this many matching jobs first (paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

/// The most jobs `GET /jobs` answers at once: what one request costs the
/// daemon stays bounded however long the history. The answer's `Herd-Total`
/// header counts every match; page with `offset`.
pub const MAX_JOBS_PAGE: usize = 1000;

/// How far a running job is, in its own units (steps, rows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// A job as `GET /jobs/{id}` and `GET /jobs` answer: its view and, while it
/// runs, its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    #[serde(flatten)]
    pub view: JobView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl std::ops::Deref for Job {
    type Target = JobView;
    fn deref(&self) -> &JobView {
        &self.view
    }
}

impl Job {
    pub fn is_final(&self) -> bool {
        self.view.status.is_final()
    }
    /// The last value of metric `name`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.view.last_metrics.get(name).map(|x| x.1)
    }
}

/// `GET /jobs/{id}/metrics`: one attempt's series, name -> [(step, value)]
/// (non-finite values as `"NaN"`, `"Infinity"`, `"-Infinity"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSeries {
    pub attempt: u32,
    pub attempts: u32,
    #[serde(with = "crate::number::series")]
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// With `?points=N`: how many points each series has in the window,
    /// of which `series` holds a sample (see the API's metrics query).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
}

/// `GET /metrics?jobs=A,B&points=N`: many jobs' series, sampled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManyMetricSeries {
    pub jobs: BTreeMap<Uuid, MetricSeries>,
}

/// `201` answer to creating something by id (`POST /experiments`, `/runs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub id: Uuid,
}

/// `201` answer to importing a dataset or a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    pub hash: String,
    pub summary: Value,
}

/// `GET /kinds`: what each job kind takes and makes, from the daemon's
/// recipe registry (the same one that checks submissions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindInfo {
    pub kind: JobKind,
    pub inputs: Vec<KindInput>,
    /// For kinds that take any input names (average, mix): at least this many,
    /// each one of `at_least_accepts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_least_accepts: Vec<ArtifactKind>,
    pub outputs: Vec<KindOutput>,
    /// Every hyperparameter with its default (anything else is refused).
    pub hyperparameters: Value,
    /// The accepted interval of each numeric one that has one: `[1, 4096]`.
    #[serde(default)]
    pub ranges: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindInput {
    pub name: String,
    pub required: bool,
    /// The artifact kinds this input accepts.
    pub accepts: Vec<ArtifactKind>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindOutput {
    pub name: String,
    /// Its artifact kind, or the input whose kind it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
}

/// `GET /trees/{hash}`: a stored directory (a checkpoint's files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeListing {
    pub herd_tree: u32,
    pub files: Vec<TreeFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeFile {
    pub name: String,
    pub blob: String,
    pub size: u64,
}

/// `GET /artifacts/{hash}`: the artifact and, for a dataset, its first rows
/// (`?rows=N`, default 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactDetail {
    pub artifact: ArtifactView,
    #[serde(default)]
    pub rows: Vec<Value>,
}

/// `GET /artifacts`: one artifact (its fields at the top level) and, for a
/// job's output, who made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedArtifact {
    #[serde(flatten)]
    pub artifact: ArtifactView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_by: Option<MadeBy>,
}

/// The job an output came from, by the names people use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MadeBy {
    pub job: Uuid,
    pub kind: JobKind,
    /// The job's name.
    pub name: String,
    /// `EXPERIMENT/ROUND/JOB.OUTPUT` (`my-exp/0/sft.checkpoint`), with the
    /// parts the job has: the address `herd show` takes, plus the output.
    pub label: String,
}

impl MadeBy {
    /// `job`: its id, kind and name.
    pub fn new(
        job: (Uuid, JobKind, &str),
        experiment: Option<&str>,
        round: Option<u32>,
        output: &str,
    ) -> Self {
        let (id, kind, name) = job;
        let mut label = String::new();
        if let Some(e) = experiment {
            label += &format!("{e}/");
        }
        if let Some(r) = round {
            label += &format!("{r}/");
        }
        label += &format!("{name}.{output}");
        MadeBy {
            job: id,
            kind,
            name: name.to_string(),
            label,
        }
    }
}

/// `GET /artifacts` query: filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArtifactQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ArtifactKind>,
    /// Only imports (`false`) or only job outputs (`true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced: Option<bool>,
}

/// `GET /experiments/{id}`: the experiment and its rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentDetail {
    pub experiment: ExperimentView,
    pub rounds: Vec<RoundView>,
}

/// `201` answer to `POST /rounds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSubmitted {
    pub id: Uuid,
    pub index: u32,
    pub jobs: Vec<Uuid>,
}

/// `GET /rounds/{id}`: the round and its jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundDetail {
    pub round: RoundView,
    pub jobs: Vec<Job>,
}

/// One re-run job: which job it reproduces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reproduction {
    pub original: Uuid,
    pub reproduction: Uuid,
}

/// `201` answer to `POST /rounds/{id}/reproduce`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReproduced {
    pub round: Uuid,
    pub jobs: Vec<Reproduction>,
}

/// `201` answer to `POST /jobs/{id}/reproduce`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReproduced {
    pub id: Uuid,
    pub reproduces: Uuid,
}

/// `POST /verify`: every problem found (none: `ok`), and what was checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub ok: bool,
    /// The chain (events, last hash), the blobs (count, bytes), artifacts checked.
    pub report: Value,
    pub problems: Vec<String>,
    /// The problems in one line ("" when ok).
    pub error: String,
}

/// `201` answer to `POST /blobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobStored {
    pub id: String,
    pub size: u64,
    /// The same bytes were already stored, intact.
    pub existed: bool,
    /// A stored copy was corrupt and these bytes replaced it.
    pub repaired: bool,
}

/// `POST /experiments`: a new experiment (names are unique).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewExperiment {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `POST /checkpoints`: a model (or PEFT adapter) directory whose files
/// were uploaded to `/blobs` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCheckpoint {
    pub name: String,
    /// file name -> blob hash
    pub files: BTreeMap<String, String>,
    /// For a PEFT adapter (adapter_config.json among the files): the
    /// recorded checkpoint it adapts.
    #[serde(default)]
    pub base: Option<String>,
}

/// `POST /datasets?kind=&name=`: the query of a dataset import (the body
/// is the JSONL itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetQuery {
    /// preference, sft or prompts
    pub kind: String,
    pub name: String,
}

/// `POST /verifiers?name=`: the query of a verifier program's import (the
/// body is the program itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierQuery {
    pub name: String,
}

/// `POST /runs`: an external run (a training script herd did not launch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRun {
    pub name: String,
    #[serde(default)]
    pub experiment: Option<Uuid>,
    /// An object of name -> value.
    #[serde(default)]
    pub hyperparameters: Value,
}

/// `POST /runs/{id}/metrics`: points of an open run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBatch {
    pub points: Vec<crate::model::MetricPoint>,
}

/// The answer to a metric batch: how many points, recorded at which event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsAccepted {
    pub accepted: usize,
    pub seq: u64,
}

/// `POST /runs/{id}/artifacts`: a recorded blob as an output of an open run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOutput {
    pub name: String,
    pub hash: String,
    pub artifact: ArtifactKind,
    #[serde(default)]
    pub summary: Value,
}

/// `POST /runs/{id}/close`: how an external run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEnded {
    /// succeeded or failed
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

/// `POST /rounds`: a round of jobs that name each other's outputs
/// (`job.output`) and the round's variables (`$name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSpec {
    pub experiment: Uuid,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    pub jobs: Vec<RoundJob>,
    /// `job.output` naming the policy the next round starts from.
    #[serde(default)]
    pub final_policy: Option<String>,
}

/// One job of a round spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundJob {
    pub name: String,
    pub kind: String,
    pub inputs: BTreeMap<String, String>,
    #[serde(default)]
    pub hyperparameters: Value,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub priority: i32,
    /// What the job asks of a cluster executor (`cpus=4,gpus=1,mem=16G,time=1:00:00`).
    #[serde(default)]
    pub resources: crate::Resources,
}

/// `GET /resolve/{prefix}`: what a short id or hash (at least
/// [`MIN_ID_PREFIX`] hex characters, dashes ignored) may stand for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    /// At most [`MAX_ID_MATCHES`], in order of kind then id.
    pub matches: Vec<IdMatch>,
    /// Whether there were more.
    pub more: bool,
}

/// One recorded thing an id prefix matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdMatch {
    /// job, round, experiment or artifact
    pub what: String,
    /// The full id (a UUID, or a content hash).
    pub id: String,
    /// Its name, to tell matches apart.
    pub name: String,
}

/// The shortest id prefix herd resolves: 8 hex characters (4 bytes).
pub const MIN_ID_PREFIX: usize = 8;
/// The most matches one prefix lists.
pub const MAX_ID_MATCHES: usize = 20;
