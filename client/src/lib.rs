//! A typed client for herdd's HTTP API, usable from any Rust program, and
//! the `herd` command-line tool built on it ([`cli`]).
//!
//! ```no_run
//! let c = herd_client::Client::connect(None, None, None).unwrap();
//! let exp = c.create_experiment("demo", "").unwrap();
//! println!("{exp}");
//! ```

pub mod cli;
mod imports;
pub mod parquet;
pub mod plot;
pub mod progress;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach herdd at {server}: {reason} (is the daemon running? start it with `herdd`; the address comes from --server, else HERD_SERVER, else the `address` file herdd writes in its data directory (--data-dir or HERD_DATA_DIR))"
    )]
    Down { server: String, reason: String },
    #[error("herdd refused the token (401): set HERD_TOKEN or --token, or point --data-dir at the daemon's data directory")]
    Unauthorized,
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("unexpected answer from herdd: {0}")]
    Decode(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

pub use herd_core::model::MetricPoint;
pub use herd_core::model::{ArtifactView, ExperimentView, JobView, LineageNode, RoundView};
pub use herd_core::wire::{
    ArtifactDetail, ArtifactQuery, BlobStored, Created, ExperimentDetail, IdMatch, Imported, Job,
    JobQuery, JobReproduced, JobRequest, JobSubmitted, KindInfo, ListedArtifact, MadeBy,
    MetricBatch, MetricSeries, MetricsAccepted, NewCheckpoint, NewExperiment, NewRun, Progress,
    Reproduction, Resolved, RoundDetail, RoundJob, RoundReproduced, RoundSpec, RoundSubmitted,
    RunEnded, RunOutput, TreeListing, Verification, MAX_JOBS_PAGE,
};

pub use herd_core::{ArtifactKind, BlobHash, InputRef, JobKind, JobStatus};

pub struct Client {
    pub server: String,
    token: String,
    agent: ureq::Agent,
}

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7447";

/// The daemon's default data directory (where its token lives).
pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("herd")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What people type for the daemon's address, as a URL: `host:port` gets
/// `http://`, a trailing `/` goes.
pub fn server_url(s: &str) -> String {
    let s = s.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

impl Client {
    pub fn new(server: &str, token: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .build();
        Client {
            server: server_url(server),
            token: token.to_string(),
            agent,
        }
    }

    /// Server and token from arguments, then `HERD_SERVER`/`HERD_TOKEN`, then
    /// the local daemon's data directory.
    pub fn connect(
        server: Option<String>,
        token: Option<String>,
        data_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let dir = data_dir
            .or_else(|| std::env::var_os("HERD_DATA_DIR").map(PathBuf::from))
            .unwrap_or_else(default_data_dir);
        // The daemon writes where it listens into its data directory.
        let server = server
            .or_else(|| std::env::var("HERD_SERVER").ok())
            .or_else(|| {
                let text = std::fs::read_to_string(dir.join("address")).ok()?;
                Some(text.trim().to_string()).filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        let token = match token.or_else(|| std::env::var("HERD_TOKEN").ok()) {
            Some(t) => t,
            None => {
                let path = dir.join("token");
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        let why = if e.kind() == std::io::ErrorKind::NotFound {
                            format!(
                                "no daemon token at {}: is herdd running? start it with `herdd` \
                                 (or `herdd --data-dir DIR` and `herd --data-dir DIR`)",
                                path.display()
                            )
                        } else {
                            format!("cannot read the daemon token at {}: {e}", path.display())
                        };
                        ClientError::Usage(format!(
                            "{why}; for a remote daemon pass --token or set HERD_TOKEN"
                        ))
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Client::new(&server, &token))
    }

    /// The daemon's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.server, path)
    }

    fn handle(
        &self,
        r: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response> {
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(401, _)) => Err(ClientError::Unauthorized),
            Err(ureq::Error::Status(code, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or(body);
                Err(ClientError::Api {
                    status: code,
                    message,
                })
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Down {
                server: self.server.clone(),
                reason: t.to_string(),
            }),
        }
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    fn json(resp: ureq::Response) -> Result<Value> {
        resp.into_json::<Value>()
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        Self::json(self.handle(self.req("GET", path).call())?)
    }

    /// POST a body (one of `herd_core::wire`'s types; any JSON works).
    pub fn post<B: serde::Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<Value> {
        Self::json(self.handle(self.req("POST", path).send_json(body))?)
    }

    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub fn health(&self) -> Result<Value> {
        Self::json(self.handle(self.agent.get(&self.url("/health")).call())?)
    }

    pub fn status(&self) -> Result<Value> {
        self.get("/status")
    }

    pub fn create_experiment(&self, name: &str, description: &str) -> Result<String> {
        let v: Created = Self::typed(self.post(
            "/experiments",
            &NewExperiment {
                name: name.into(),
                description: description.into(),
            },
        )?)?;
        Ok(v.id.to_string())
    }

    pub fn experiments(&self) -> Result<Vec<ExperimentView>> {
        Self::typed(self.get("/experiments")?)
    }

    pub fn experiment(&self, id: &str) -> Result<ExperimentDetail> {
        Self::typed(self.get(&format!("/experiments/{}", enc(id)))?)
    }

    pub fn artifacts(&self, q: &ArtifactQuery) -> Result<Vec<ListedArtifact>> {
        let mut params = vec![];
        if let Some(k) = q.kind {
            params.push(format!("kind={k}"));
        }
        if let Some(p) = q.produced {
            params.push(format!("produced={p}"));
        }
        Self::typed(self.get(&format!("/artifacts?{}", params.join("&")))?)
    }

    /// An artifact and, for a dataset, its first `rows` rows.
    pub fn artifact(&self, hash: &str, rows: usize) -> Result<ArtifactDetail> {
        Self::typed(self.get(&format!("/artifacts/{}?rows={rows}", enc(hash)))?)
    }

    /// Every job kind: inputs, outputs, hyperparameters with defaults.
    pub fn kinds(&self) -> Result<Vec<KindInfo>> {
        Self::typed(self.get("/kinds")?)
    }

    pub fn submit(&self, req: &JobRequest) -> Result<JobSubmitted> {
        Self::typed(self.post("/jobs", req)?)
    }

    pub fn job(&self, id: &str) -> Result<Job> {
        Self::typed(self.get(&format!("/jobs/{}", enc(id)))?)
    }

    pub fn jobs(&self, q: &JobQuery) -> Result<Vec<Job>> {
        let mut params = vec![];
        for (k, v) in [
            ("experiment", q.experiment.map(|e| e.to_string())),
            ("kind", q.kind.map(|k| k.to_string())),
            ("status", q.status.map(|s| s.to_string())),
            ("round", q.round.map(|r| r.to_string())),
            ("where", q.where_.clone()),
            ("sort", q.sort.clone()),
        ] {
            if let Some(v) = v {
                params.push(format!("{k}={}", enc(&v)));
            }
        }
        // The daemon answers at most MAX_JOBS_PAGE jobs a request: page.
        let mut out: Vec<Job> = vec![];
        let mut offset = q.offset.unwrap_or(0);
        loop {
            let want = q
                .limit
                .map_or(usize::MAX, |l| l - out.len())
                .min(MAX_JOBS_PAGE);
            if want == 0 {
                return Ok(out);
            }
            let page: Vec<Job> = Self::typed(self.get(&format!(
                "/jobs?{}limit={want}&offset={offset}",
                params.iter().map(|p| format!("{p}&")).collect::<String>()
            ))?)?;
            let n = page.len();
            out.extend(page);
            offset += n;
            if n < want {
                return Ok(out);
            }
        }
    }

    /// Metric series of the job's latest attempt: name -> [(step, value)].
    pub fn metrics(&self, id: &str, names: &[&str]) -> Result<BTreeMap<String, Vec<(u64, f64)>>> {
        self.metrics_of_attempt(id, names, None)
    }

    /// Metric series of one attempt (1-based; None: the latest).
    pub fn metrics_of_attempt(
        &self,
        id: &str,
        names: &[&str],
        attempt: Option<u32>,
    ) -> Result<BTreeMap<String, Vec<(u64, f64)>>> {
        let mut q = vec![];
        if !names.is_empty() {
            q.push(format!("names={}", enc(&names.join(","))));
        }
        if let Some(a) = attempt {
            q.push(format!("attempt={a}"));
        }
        let q = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        let m: MetricSeries = Self::typed(self.get(&format!("/jobs/{}/metrics{q}", enc(id)))?)?;
        Ok(m.series)
    }

    /// Metric series of the latest attempt sampled for `points` pixels
    /// (each bucket's extremes, NaN marks, first and last; the whole series
    /// when short), over steps `from..=to` when given.
    pub fn sampled_metrics(
        &self,
        id: &str,
        names: &[&str],
        points: usize,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<MetricSeries> {
        let mut q = vec![format!("points={points}")];
        if !names.is_empty() {
            q.push(format!("names={}", enc(&names.join(","))));
        }
        q.extend(from.map(|f| format!("from={f}")));
        q.extend(to.map(|t| format!("to={t}")));
        Self::typed(self.get(&format!("/jobs/{}/metrics?{}", enc(id), q.join("&")))?)
    }

    pub fn cancel(&self, id: &str) -> Result<Value> {
        self.post(&format!("/jobs/{}/cancel", enc(id)), &json!({}))
    }

    pub fn reproduce_job(&self, id: &str) -> Result<JobReproduced> {
        Self::typed(self.post(&format!("/jobs/{}/reproduce", enc(id)), &json!({}))?)
    }

    /// Submit a round: a `RoundSpec` (or the same as JSON, as a spec file
    /// holds it).
    pub fn submit_round<S: serde::Serialize + ?Sized>(&self, spec: &S) -> Result<RoundSubmitted> {
        Self::typed(self.post("/rounds", spec)?)
    }

    pub fn round(&self, id: &str) -> Result<RoundDetail> {
        Self::typed(self.get(&format!("/rounds/{}", enc(id)))?)
    }

    pub fn reproduce_round(&self, id: &str) -> Result<RoundReproduced> {
        Self::typed(self.post(&format!("/rounds/{}/reproduce", enc(id)), &json!({}))?)
    }

    pub fn open_run(
        &self,
        name: &str,
        experiment: Option<&str>,
        hyperparameters: &Value,
    ) -> Result<String> {
        let experiment = experiment
            .map(|e| {
                e.parse()
                    .map_err(|_| ClientError::Usage(format!("{e:?} is not an experiment id")))
            })
            .transpose()?;
        let v = self.post(
            "/runs",
            &NewRun {
                name: name.into(),
                experiment,
                hyperparameters: hyperparameters.clone(),
            },
        )?;
        Ok(Self::typed::<Created>(v)?.id.to_string())
    }

    /// Log metric points `(step, name, value)` to an open run.
    pub fn log_metrics(&self, run: &str, points: &[(u64, &str, f64)]) -> Result<MetricsAccepted> {
        let points = points
            .iter()
            .map(|&(step, name, value)| MetricPoint {
                step,
                name: name.into(),
                value,
            })
            .collect();
        Self::typed(self.post(
            &format!("/runs/{}/metrics", enc(run)),
            &MetricBatch { points },
        )?)
    }

    pub fn log_artifact(
        &self,
        run: &str,
        name: &str,
        hash: &str,
        artifact: ArtifactKind,
    ) -> Result<Value> {
        self.post(
            &format!("/runs/{}/artifacts", enc(run)),
            &RunOutput {
                name: name.into(),
                hash: hash.into(),
                artifact,
                summary: Value::Null,
            },
        )
    }

    pub fn close_run(&self, run: &str, succeeded: bool, reason: &str) -> Result<Value> {
        self.post(
            &format!("/runs/{}/close", enc(run)),
            &RunEnded {
                status: if succeeded { "succeeded" } else { "failed" }.into(),
                reason: reason.into(),
            },
        )
    }

    /// What a short id or hash (8+ hex characters) may stand for.
    pub fn resolve(&self, prefix: &str) -> Result<Resolved> {
        Self::typed(self.get(&format!("/resolve/{}", enc(prefix)))?)
    }

    pub fn lineage(&self, hash: &str) -> Result<LineageNode> {
        Self::typed(self.get(&format!("/lineage/{}", enc(hash)))?)
    }

    pub fn tree(&self, hash: &str) -> Result<TreeListing> {
        Self::typed(self.get(&format!("/trees/{}", enc(hash)))?)
    }

    /// Stream a blob into `out`; the daemon verifies it as it sends.
    /// Stream blob `hash` into `out`, hashing what arrives: bytes that don't
    /// hash to `hash` (a corrupt blob, a cut connection) are an error.
    /// A checkpoint as one GGUF file (`dtype` f16 or q8_0), converted by
    /// herdd from the verified blobs, into `out`; its size.
    pub fn export_gguf(
        &self,
        hash: &str,
        dtype: &str,
        out: &mut dyn std::io::Write,
    ) -> Result<u64> {
        let resp = self.handle(
            self.req(
                "GET",
                &format!("/artifacts/{}/gguf?dtype={}", enc(hash), enc(dtype)),
            )
            .call(),
        )?;
        std::io::copy(&mut resp.into_reader(), out).map_err(|e| ClientError::Io {
            path: format!("GGUF of {hash}"),
            source: e,
        })
    }

    pub fn download(&self, hash: &str, out: &mut dyn std::io::Write) -> Result<u64> {
        use sha2::Digest;
        let resp = self.handle(self.req("GET", &format!("/blobs/{}", enc(hash))).call())?;
        let mut reader = resp.into_reader();
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut size = 0u64;
        let io = |e| ClientError::Io {
            path: format!("blob {hash}"),
            source: e,
        };
        loop {
            let n = match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io)?;
            size += n as u64;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != hash {
            return Err(ClientError::Decode(format!(
                "blob {hash} arrived as bytes hashing to {actual} ({size} bytes): not written"
            )));
        }
        Ok(size)
    }

    /// Write a checkpoint (tree) as a Hugging Face directory. Every file is
    /// written into a temporary directory beside `dir` and checked against
    /// its hash; only when all are there does it become `dir` (renamed, or
    /// its files moved into an existing `dir`): a failed export leaves
    /// nothing behind.
    pub fn export(&self, hash: &str, dir: &Path) -> Result<Vec<String>> {
        let tree = self.tree(hash)?;
        let io = |path: &Path, e| ClientError::Io {
            path: path.display().to_string(),
            source: e,
        };
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
        let leaf = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        let staging = parent.join(format!(".{leaf}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
        let written = (|| -> Result<Vec<String>> {
            let mut names = vec![];
            for f in tree.files {
                let name = f.name;
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    return Err(ClientError::Decode(format!(
                        "unsafe file name {name:?} in tree {hash}"
                    )));
                }
                let path = staging.join(&name);
                let mut out = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
                self.download(&f.blob, &mut out)?;
                out.sync_all().map_err(|e| io(&path, e))?;
                names.push(name);
            }
            Ok(names)
        })();
        let names = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        if !dir.exists() {
            std::fs::rename(&staging, dir).map_err(|e| io(dir, e))?;
        } else {
            for n in &names {
                std::fs::rename(staging.join(n), dir.join(n)).map_err(|e| io(&dir.join(n), e))?;
            }
            let _ = std::fs::remove_dir_all(&staging);
        }
        Ok(names)
    }

    pub fn verify(&self) -> Result<Verification> {
        Self::typed(self.post("/verify", &json!({}))?)
    }

    /// Wait until the job ends (or `timeout` passes), polling.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<Job> {
        let start = Instant::now();
        loop {
            let j = self.job(id)?;
            if j.is_final() {
                return Ok(j);
            }
            if start.elapsed() > timeout {
                return Err(ClientError::Usage(format!(
                    "job {id} still {} after {:?}",
                    j.status, timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Server-sent events from sequence `from`, as JSON records, until `f`
    /// returns false.
    pub fn follow_events(&self, from: u64, mut f: impl FnMut(Value) -> bool) -> Result<()> {
        let resp = self.handle(self.req("GET", &format!("/events?from={from}")).call())?;
        let reader = std::io::BufReader::new(resp.into_reader());
        for line in std::io::BufRead::lines(reader) {
            let line = line.map_err(|e| ClientError::Io {
                path: "event stream".into(),
                source: e,
            })?;
            if let Some(data) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(data.trim())
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                if !f(v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Read a whole file (small specs).
pub fn read_file(path: &Path) -> Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| ClientError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    Ok(s)
}
