//! The Slurm side of the executor seam: the commands herd runs (`sbatch`,
//! `scancel`, `scontrol show job`), what their answers mean, and the probe
//! that checks at start that cluster nodes see the data directory.
//!
//! Why `scontrol` and not `sacct`: accounting is an optional Slurm service
//! (many small clusters run without it); `scontrol show job` answers from
//! the controller for as long as it keeps a finished job (`MinJobAge`).
//! Why herd requeues itself (`--no-requeue`): an attempt is herd's record
//! (its own `JobStarted`, its own messages file), so a node failure ends
//! the Slurm job and herd submits a new attempt under its requeue policy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use herd_core::{JobKind, Resources};
use uuid::Uuid;

/// When Slurm ends a job for a reason that is not the job's own doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeuePolicy {
    /// Node failure, boot failure and preemption start a new attempt (up to
    /// the daemon's attempt limit); a time limit, out-of-memory or a failing
    /// job do not (they would end the same way again).
    OnNodeFailure,
    Never,
}

impl std::str::FromStr for RequeuePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on-node-failure" => Ok(RequeuePolicy::OnNodeFailure),
            "never" => Ok(RequeuePolicy::Never),
            _ => Err(format!("{s:?}: on-node-failure or never")),
        }
    }
}

/// `herdd --executor slurm` and its options.
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// The GRES a job asks for per GPU it wants: `gpu` gives `--gres=gpu:N`,
    /// `gpu:a100` gives `--gres=gpu:a100:N`.
    pub gres: String,
    /// More `sbatch` arguments, given to every job as they are.
    pub extra_args: Vec<String>,
    /// Jobs in flight (pending or running in Slurm) at most.
    pub max_in_flight: usize,
    /// Resources for every kind, then per kind, then the job's own request.
    pub defaults: Resources,
    pub per_kind: Vec<(JobKind, Resources)>,
    pub requeue: RequeuePolicy,
    /// How long the start-up probe job may take (queueing included).
    pub probe_timeout: Duration,
    /// How often a job's state is asked of the controller.
    pub poll: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            qos: None,
            gres: "gpu".into(),
            extra_args: vec![],
            max_in_flight: 64,
            defaults: Resources {
                cpus: Some(2),
                gpus: Some(0),
                mem_mb: Some(8 * 1024),
                time_min: Some(24 * 60),
            },
            per_kind: vec![],
            requeue: RequeuePolicy::OnNodeFailure,
            probe_timeout: Duration::from_secs(300),
            poll: Duration::from_secs(1),
        }
    }
}

impl SlurmConfig {
    /// What a job of `kind` asking for `request` gets: the request over the
    /// kind's defaults over the defaults for every kind.
    pub fn resources(&self, kind: JobKind, request: Resources) -> Resources {
        let kind_default = self
            .per_kind
            .iter()
            .rev()
            .find(|(k, _)| *k == kind)
            .map(|(_, r)| *r)
            .unwrap_or_default();
        request.over(kind_default.over(self.defaults))
    }

    /// The `sbatch` arguments common to every job (not the script).
    fn common_args(&self) -> Vec<String> {
        let mut args = vec!["--parsable".to_string(), "--no-requeue".to_string()];
        for (flag, v) in [
            ("--partition", &self.partition),
            ("--account", &self.account),
            ("--qos", &self.qos),
        ] {
            if let Some(v) = v {
                args.push(format!("{flag}={v}"));
            }
        }
        args
    }
}

/// Single-quoted for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The Slurm job name of a herd job: what an orphaned submission is found by.
pub fn job_name(job: Uuid) -> String {
    format!("herd-{job}")
}

/// Where the worker of Slurm job `slurm_job` appends its messages.
pub fn messages_file(workdir: &Path, slurm_job: u64) -> PathBuf {
    workdir.join(format!("messages-{slurm_job}.jsonl"))
}

/// Where Slurm writes the batch script's own stdout and stderr.
pub fn output_file(workdir: &Path, slurm_job: u64) -> PathBuf {
    workdir.join(format!("slurm-{slurm_job}.out"))
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let name = format!("{:?}", cmd.get_program());
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "{name} not found on PATH: --executor slurm needs Slurm's client commands (sbatch, scancel, scontrol) where herdd runs"
            )
        } else {
            anyhow!("running {name}: {e}")
        }
    })
}

/// Submit `script` (run with `sh` on a node, in `workdir`). Returns the
/// Slurm job id.
pub fn sbatch(
    config: &SlurmConfig,
    name: &str,
    resources: Resources,
    workdir: &Path,
    script: &Path,
) -> Result<u64> {
    let mut cmd = Command::new("sbatch");
    cmd.args(config.common_args())
        .arg(format!("--job-name={name}"))
        .arg(format!("--chdir={}", workdir.display()))
        .arg(format!("--output={}/slurm-%j.out", workdir.display()));
    if let Some(c) = resources.cpus {
        cmd.arg(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = resources.mem_mb {
        cmd.arg(format!("--mem={m}M"));
    }
    if let Some(t) = resources.time_min {
        cmd.arg(format!("--time={t}"));
    }
    if let Some(g) = resources.gpus.filter(|g| *g > 0) {
        cmd.arg(format!("--gres={}:{g}", config.gres));
    }
    cmd.args(&config.extra_args).arg(script);
    let out = run(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("");
    id.parse::<u64>()
        .map_err(|_| anyhow!("sbatch answered {text:?}, not a job id"))
}

/// Cancel one Slurm job.
pub fn scancel(slurm_job: u64) -> Result<()> {
    let out = run(Command::new("scancel").arg(slurm_job.to_string()))?;
    if !out.status.success() {
        bail!(
            "scancel {slurm_job}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Cancel every Slurm job of ours with this name (what a daemon that died
/// between `sbatch` and recording the attempt left behind).
pub fn scancel_by_name(name: &str) -> Result<()> {
    let out = run(Command::new("scancel").arg(format!("--name={name}")))?;
    if !out.status.success() {
        bail!(
            "scancel --name={name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A Slurm job as `scontrol show job` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub state: String,
    pub reason: String,
    pub exit_code: String,
    pub nodes: String,
    pub time_limit: String,
}

/// What the controller says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Known(JobInfo),
    /// The controller no longer (or never) knew it: purged after MinJobAge.
    Gone,
}

impl JobInfo {
    /// Still pending, running or being cleaned up.
    pub fn is_active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "CONFIGURING"
                | "RUNNING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "REQUEUE_FED"
                | "REQUEUE_HOLD"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "SPECIAL_EXIT"
                | "RESV_DEL_HOLD"
                | "STOPPED"
        )
    }

    /// Ended by the cluster, not by the job: worth another attempt.
    pub fn is_node_failure(&self) -> bool {
        matches!(self.state.as_str(), "NODE_FAIL" | "BOOT_FAIL" | "PREEMPTED")
    }

    /// Slurm's own words for how the job ended.
    pub fn describe(&self, slurm_job: u64) -> String {
        let mut s = format!("Slurm job {slurm_job} ended {}", self.state);
        match self.state.as_str() {
            "TIMEOUT" => s.push_str(&format!(": it hit its time limit ({})", self.time_limit)),
            "OUT_OF_MEMORY" => s.push_str(": it ran out of its memory limit"),
            _ => {}
        }
        let mut details = vec![];
        if !matches!(self.reason.as_str(), "None" | "(null)" | "") {
            details.push(format!("Reason={}", self.reason));
        }
        if !matches!(self.exit_code.as_str(), "0:0" | "") {
            details.push(format!("ExitCode={}", self.exit_code));
        }
        if !matches!(self.nodes.as_str(), "(null)" | "") {
            details.push(format!("NodeList={}", self.nodes));
        }
        if !details.is_empty() {
            s.push_str(&format!(" ({})", details.join(" ")));
        }
        s
    }
}

/// Parse `scontrol show job -o` output (one line of `Key=Value` words).
pub fn parse_job(text: &str) -> Option<JobInfo> {
    let field = |key: &str| -> String {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or("")
            .to_string()
    };
    let state = field("JobState");
    if state.is_empty() {
        return None;
    }
    Some(JobInfo {
        state,
        reason: field("Reason"),
        exit_code: field("ExitCode"),
        nodes: field("NodeList"),
        time_limit: field("TimeLimit"),
    })
}

/// Ask the controller about one job.
pub fn show_job(slurm_job: u64) -> Result<Observed> {
    let out = run(Command::new("scontrol").args(["show", "job", "-o", &slurm_job.to_string()]))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("Invalid job id") {
            return Ok(Observed::Gone);
        }
        bail!("scontrol show job {slurm_job}: {}", stderr.trim());
    }
    parse_job(&stdout)
        .map(Observed::Known)
        .ok_or_else(|| anyhow!("scontrol show job {slurm_job} said {:?}", stdout.trim()))
}

/// The last `max` characters of a file (a Slurm output file, for a reason).
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim().to_string()
}

/// At start: a tiny job that must see the data directory from a node.
/// The daemon writes a nonce under DATA/work; the probe (`herdd worker
/// --probe FILE`) reads it and writes it back with the node's name. A
/// cluster that cannot run it, or nodes that do not share the directory,
/// give a clear error before any real job is submitted.
pub fn probe(config: &SlurmConfig, worker_command: &[String], data_dir: &Path) -> Result<String> {
    let dir = data_dir
        .join("work")
        .join(format!("probe-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let nonce = Uuid::now_v7().to_string();
    let file = dir.join("probe");
    std::fs::write(&file, &nonce)?;
    let script = dir.join("probe.sh");
    let command: Vec<String> = worker_command.iter().map(|a| sh_quote(a)).collect();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# herd's start-up probe: can a node see the data directory?\nexec {} --probe {}\n",
            command.join(" "),
            sh_quote(&file.display().to_string())
        ),
    )?;
    let probe_resources = Resources {
        cpus: Some(1),
        gpus: Some(0),
        mem_mb: Some(256),
        time_min: Some(5),
    };
    let id = sbatch(config, "herd-probe", probe_resources, &dir, &script)
        .context("submitting the start-up probe job")?;
    let started = Instant::now();
    let info = loop {
        match show_job(id)? {
            Observed::Known(info) if !info.is_active() => break Some(info),
            Observed::Gone => break None,
            Observed::Known(_) => {}
        }
        if started.elapsed() > config.probe_timeout {
            let _ = scancel(id);
            bail!(
                "the start-up probe (Slurm job {id}) did not finish within {:?}: is the partition up and not full? (--slurm-probe-timeout)",
                config.probe_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let answer = std::fs::read_to_string(dir.join("probe.ok")).unwrap_or_default();
    let result = match answer.split_once(' ') {
        Some((n, node)) if n == nonce => Ok(node.trim().to_string()),
        _ => {
            let said = tail(&output_file(&dir, id), 1000);
            let how = info
                .map(|i| i.describe(id))
                .unwrap_or_else(|| format!("Slurm job {id} ended"));
            Err(anyhow!(
                "the start-up probe ({how}) could not read and write {}: the data directory must be on a filesystem every Slurm node mounts at the same path, and the worker command ({}) must run there{}",
                dir.display(),
                worker_command.join(" "),
                if said.is_empty() { String::new() } else { format!("; the job said: {said}") }
            ))
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The node's side of the probe: read the nonce, write it back with the
/// host name. Exit status 0 when it could.
pub fn answer_probe(file: &Path) -> i32 {
    let run = || -> Result<()> {
        let nonce = std::fs::read_to_string(file)
            .with_context(|| format!("reading {} from this node", file.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let ok = file.with_extension("ok");
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {host}", nonce.trim()))?;
        std::fs::rename(&tmp, &ok)?;
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("herdd worker --probe: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scontrol_words() {
        let line = "JobId=7 JobName=herd-x UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) Requeue=0 ExitCode=0:15 RunTime=00:01:31 TimeLimit=00:01:00 NodeList=n1 BatchHost=n1";
        let info = parse_job(line).unwrap();
        assert_eq!(info.state, "TIMEOUT");
        assert!(!info.is_active());
        assert_eq!(
            info.describe(7),
            "Slurm job 7 ended TIMEOUT: it hit its time limit (00:01:00) (Reason=TimeLimit ExitCode=0:15 NodeList=n1)"
        );
        assert!(parse_job("slurm_load_jobs error").is_none());
        let nf = parse_job("JobState=NODE_FAIL Reason=NodeDown NodeList=n2").unwrap();
        assert!(nf.is_node_failure() && !nf.is_active());
        assert!(parse_job("JobState=PENDING Reason=Resources")
            .unwrap()
            .is_active());
    }

    #[test]
    fn resources_layer_request_over_kind_over_defaults() {
        let config = SlurmConfig {
            per_kind: vec![(JobKind::Sft, "gpus=1,mem=32G".parse().unwrap())],
            ..Default::default()
        };
        let r = config.resources(JobKind::Sft, "mem=4G".parse().unwrap());
        assert_eq!(r.to_string(), "cpus=2,gpus=1,mem=4G,time=24:00:00");
        let r = config.resources(JobKind::Eval, Resources::default());
        assert_eq!(r.to_string(), "cpus=2,gpus=0,mem=8G,time=24:00:00");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
