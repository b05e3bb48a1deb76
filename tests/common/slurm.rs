//! A one-node Slurm cluster for tests: munged, slurmctld and slurmd started
//! by hand in a temp directory (no systemd), on free loopback ports, with
//! the node's name from `hostname` and more CPUs than the machine has
//! (`config_overrides`) so tests can run jobs side by side, and a scheduler
//! that starts a batch job as soon as it can (`batch_sched_delay=0`,
//! `sched_min_interval=0`: ~1 s from sbatch to a running job instead of ~2-3). Stopped when
//! dropped: every job cancelled first (else slurmd retries for seconds),
//! then `scontrol shutdown`, then whatever is left is killed.
//!
//! Needs root and Debian's slurmctld, slurmd, slurm-client and munge. When
//! they are missing and this runs as root with apt-get, the first test
//! installs them (once per test binary; `.ci/run` does it up front too).
//! Without them `cluster_or_skip` says why and the test is skipped loudly;
//! with `HERD_REQUIRE_SLURM=1` (set by `.ci/run` once it installed them) a
//! missing cluster fails the test instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    /// The node's name.
    pub host: String,
    children: Vec<Child>,
    munged_pid: Option<u32>,
}

use super::system::{apt_install_once, free_port, skip, uid, which};

const PACKAGES: &[&str] = &["slurmctld", "slurmd", "slurm-client", "munge"];

fn sbin(program: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(program);
    if p.is_file() {
        p
    } else {
        PathBuf::from(program)
    }
}

/// Start a cluster, or say why this test cannot have one: a skip printed
/// loudly (and appended to `$HERD_SKIP_LOG` for `.ci/run`'s summary), or
/// a panic when `HERD_REQUIRE_SLURM=1`.
pub fn cluster_or_skip(test: &str) -> Option<Cluster> {
    match Cluster::start() {
        Ok(c) => Some(c),
        Err(why) => {
            skip(
                test,
                &format!("no local Slurm cluster: {why}"),
                "HERD_REQUIRE_SLURM",
            );
            None
        }
    }
}

impl Cluster {
    pub fn start() -> Result<Cluster, String> {
        Self::start_with_cpus(8)
    }

    /// A node that says it has `cpus` CPUs (8 for tests: more jobs side by
    /// side than the machine's cores; benches give the real count).
    pub fn start_with_cpus(cpus: usize) -> Result<Cluster, String> {
        let uid = uid();
        if uid != "0" {
            return Err(format!("not root (uid {uid}): slurmd must run as root"));
        }
        let programs = [
            "munged",
            "slurmctld",
            "slurmd",
            "sbatch",
            "scontrol",
            "scancel",
        ];
        if programs.iter().any(|p| !which(p)) {
            apt_install_once(PACKAGES).map_err(|e| {
                format!("Slurm is not installed and could not be: {e} (Debian: apt-get install slurmctld slurmd slurm-client munge)")
            })?;
        }
        if let Some(p) = programs.iter().find(|p| !which(p)) {
            return Err(format!("{p} is not installed"));
        }
        let dir = tempfile::Builder::new()
            .prefix("herd-slurm-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["munge", "state", "spool"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let sh = |script: &str| -> Result<(), String> {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{script}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let p = d.display();
        // munged wants its socket's directory world-readable and its key private.
        sh(&format!(
            "chmod 755 {p} {p}/munge && head -c 1024 /dev/urandom > {p}/munge.key && chmod 400 {p}/munge.key"
        ))?;
        let status = Command::new(sbin("munged"))
            .args([
                &format!("--key-file={p}/munge.key"),
                &format!("--socket={p}/munge/munge.socket"),
                &format!("--pid-file={p}/munged.pid"),
                &format!("--log-file={p}/munged.log"),
                &format!("--seed-file={p}/munge.seed"),
            ])
            .status()
            .map_err(|e| format!("munged: {e}"))?;
        if !status.success() {
            return Err(format!(
                "munged did not start: {}",
                std::fs::read_to_string(d.join("munged.log")).unwrap_or_default()
            ));
        }
        let munged_pid = std::fs::read_to_string(d.join("munged.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let host = Command::new("hostname")
            .arg("-s")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .map_err(|e| format!("hostname: {e}"))?;
        let conf = d.join("slurm.conf");
        let (ctld_port, d_port) = (free_port(), free_port());
        std::fs::write(
            &conf,
            format!(
                "ClusterName=herdtest\n\
                 SlurmctldHost={host}(127.0.0.1)\n\
                 AuthType=auth/munge\n\
                 AuthInfo=socket={p}/munge/munge.socket\n\
                 CryptoType=crypto/munge\n\
                 MpiDefault=none\n\
                 ProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\n\
                 SelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core_Memory\n\
                 DefMemPerCPU=256\n\
                 AccountingStorageType=accounting_storage/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 JobCompType=jobcomp/none\n\
                 SlurmUser=root\n\
                 SlurmdUser=root\n\
                 StateSaveLocation={p}/state\n\
                 SlurmdSpoolDir={p}/spool\n\
                 SlurmctldPidFile={p}/slurmctld.pid\n\
                 SlurmdPidFile={p}/slurmd.pid\n\
                 SlurmctldPort={ctld_port}\n\
                 SlurmdPort={d_port}\n\
                 SlurmctldLogFile={p}/slurmctld.log\n\
                 SlurmdLogFile={p}/slurmd.log\n\
                 MinJobAge=3600\n\
                 KillWait=2\n\
                 ReturnToService=2\n\
                 SchedulerType=sched/builtin\n\
                 SchedulerParameters=batch_sched_delay=0,sched_min_interval=0\n\
                 SlurmdParameters=config_overrides\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=16000 State=UNKNOWN\n\
                 PartitionName=herd Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut cluster = Cluster {
            conf: conf.clone(),
            host: host.clone(),
            dir,
            children: vec![],
            munged_pid,
        };
        let conf_s = conf.display().to_string();
        for (prog, args) in [
            ("slurmctld", vec!["-D", "-c", "-f", &conf_s]),
            ("slurmd", vec!["-D", "-f", &conf_s, "-N", &host]),
        ] {
            let child = Command::new(sbin(prog))
                .args(&args)
                .env("SLURM_CONF", &conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{prog}: {e}"))?;
            cluster.children.push(child);
        }
        // Up when the node is idle.
        let started = Instant::now();
        loop {
            let out = cluster.command("sinfo").args(["-h", "-o", "%T"]).output();
            if let Ok(o) = out {
                if String::from_utf8_lossy(&o.stdout).trim() == "idle" {
                    return Ok(cluster);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "the node did not come up in 30 s; slurmctld.log: {}",
                    std::fs::read_to_string(cluster.dir.path().join("slurmctld.log"))
                        .unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Slurm command talking to this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `scontrol update nodename=NODE state=STATE [reason=...]`.
    pub fn set_node(&self, state: &str) {
        let mut args = vec![
            "update".to_string(),
            format!("nodename={}", self.host),
            format!("state={state}"),
        ];
        if state == "down" {
            args.push("reason=herd-test".into());
        }
        let out = self.command("scontrol").args(&args).output().unwrap();
        let node = self
            .command("sinfo")
            .args(["-h", "-N", "-o", "%T %E"])
            .output()
            .unwrap();
        let node_state = String::from_utf8_lossy(&node.stdout).to_string();
        // ReturnToService=2 may have brought the node back already.
        let already_up = state == "resume"
            && ["idle", "mixed", "allocated"]
                .iter()
                .any(|s| node_state.starts_with(s));
        assert!(
            out.status.success() || already_up,
            "scontrol {}: {} (node: {})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&node.stdout).trim()
        );
    }

    /// `scontrol show job -o ID`'s `Key` value.
    pub fn job_field(&self, id: u64, key: &str) -> Option<String> {
        let out = self
            .command("scontrol")
            .args(["show", "job", "-o", &id.to_string()])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.command("scancel").arg("--user=root").status();
        let _ = self
            .command("scontrol")
            .arg("shutdown")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.munged_pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}
