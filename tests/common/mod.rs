//! Starting the real `herdd` binary on a temp dir and a free port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herd_client::Client;

pub mod browser;
pub mod slurm;
pub mod system;

pub fn fixtures() -> PathBuf {
    std::env::var("HERD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-tiny")
        })
}

pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_env(dir, extra, &[])
    }

    /// With more environment (`SLURM_CONF` for a test cluster).
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        Self::spawn(dir.to_str().unwrap(), None, dir, extra, env)
    }

    /// `herdd --data-dir REL` started in `cwd`: a relative data directory.
    pub fn start_relative(cwd: &Path, rel: &str) -> Daemon {
        Self::spawn(rel, Some(cwd), &cwd.join(rel), &[], &[])
    }

    fn spawn(
        data_dir_arg: &str,
        cwd: Option<&Path>,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Daemon {
        let threads: &[&str] = if extra.contains(&"--threads") {
            &[]
        } else {
            &["--threads", "1"]
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herdd"));
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .args(["--data-dir", data_dir_arg, "--listen", "127.0.0.1:0"])
            .args(threads)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herdd");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("herdd exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("herdd listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Daemon {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// `herd ARGS` against this daemon on a terminal `cols` x `rows` (a pty
    /// made by util-linux's `script`), or None where there is no `script`.
    pub fn herd_on_a_terminal(
        &self,
        cols: usize,
        rows: usize,
        args: &str,
    ) -> Option<std::process::Output> {
        Command::new("script").arg("--version").output().ok()?;
        let herd = format!(
            "stty cols {cols} rows {rows}; {} --server {} --data-dir {} {args}",
            env!("CARGO_BIN_EXE_herd"),
            self.addr,
            self.dir.display()
        );
        Some(
            Command::new("script")
                .args(["-qec", &herd, "/dev/null"])
                .env_remove("HERD_TOKEN")
                .env_remove("HERD_SERVER")
                .output()
                .unwrap(),
        )
    }

    /// `herd ARGS` against this daemon (token from its data directory).
    pub fn herd(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_herd"))
            .args([
                "--server",
                &self.addr,
                "--data-dir",
                self.dir.to_str().unwrap(),
            ])
            .args(args)
            .env_remove("HERD_TOKEN")
            .env_remove("HERD_SERVER")
            .output()
            .unwrap()
    }

    pub fn client(&self) -> Client {
        let token = std::fs::read_to_string(self.dir.join("token")).unwrap();
        Client::new(&self.addr, token.trim())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), 15);
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe_kill(self.child.id(), 15);
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}

/// Send a signal with the `kill` command (no libc dependency).
pub fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn import_fixtures(c: &Client) -> (String, String, String, String, String) {
    let f = fixtures();
    let model = |n: &str| c.import_model(&f.join(n), n).unwrap().hash;
    let (r, p, rm) = (model("ref"), model("policy"), model("rm"));
    let prefs = c
        .import_dataset(&f.join("preferences.jsonl"), "preference", "prefs")
        .unwrap()
        .hash;
    let sft = c
        .import_dataset(&f.join("sft.jsonl"), "sft", "sft")
        .unwrap()
        .hash;
    let _ = rm.clone();
    (r, p, rm, prefs, sft)
}

/// Pids of worker processes of `herdd` running `job`.
pub fn worker_pid(job: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid: u32 = match entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            Some(p) => p,
            None => continue,
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("worker") && cmd.contains(job) {
                return Some(pid);
            }
        }
    }
    None
}

/// The body of `POST /jobs` with these inputs and hyperparameters (seed 0),
/// as raw JSON: tests also send what a typed client would refuse to build.
pub fn req(kind: &str, inputs: &[(&str, &str)], hp: serde_json::Value) -> serde_json::Value {
    let inputs: serde_json::Map<String, serde_json::Value> = inputs
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    serde_json::json!({"kind": kind, "inputs": inputs, "hyperparameters": hp})
}

/// `POST /jobs` with this body; the new job's id.
pub fn submit(c: &Client, body: &serde_json::Value) -> String {
    c.post("/jobs", body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Submit an SFT of `model` on `data` that runs until it is cancelled
/// (a million steps); its id.
pub fn submit_endless_sft(c: &Client, model: &str, data: &str) -> String {
    submit(
        c,
        &req(
            "sft",
            &[("model", model), ("data", data)],
            serde_json::json!({"steps": 1_000_000}),
        ),
    )
}

/// Submit a two-step SFT of `model` on `data`, wait for it, expect success.
pub fn run_short_sft(c: &Client, model: &str, data: &str) -> herd_client::Job {
    let id = c
        .post(
            "/jobs",
            &req(
                "sft",
                &[("model", model), ("data", data)],
                serde_json::json!({"steps": 2, "batch_size": 2}),
            ),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let j = c.wait(&id, Duration::from_secs(120)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
    j
}

/// `herd` against one daemon, for tests of the CLI.
pub struct Cli<'a> {
    pub d: &'a Daemon,
}

impl Cli<'_> {
    pub fn raw(&self, args: &[&str]) -> std::process::Output {
        self.d.herd(args)
    }
    /// `herd -q ARGS`, which must succeed: the id or hash it prints.
    pub fn quiet(&self, args: &[&str]) -> String {
        let out = self.raw(&[&["-q"], args].concat());
        assert!(
            out.status.success(),
            "herd -q {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
    /// `herd ARGS` as a person sees it: stdout, which must succeed.
    pub fn text(&self, args: &[&str]) -> String {
        let out = self.raw(args);
        assert!(
            out.status.success(),
            "herd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.raw(&a);
        assert!(
            out.status.success(),
            "herd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "herd {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// Run herdd expecting it to refuse to start: its exit code and stderr.
pub fn herdd_refuses(dir: &Path, extra: &[&str]) -> (i32, String) {
    let listen: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_herdd"))
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(listen)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("herdd {extra:?} should have refused to start but kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
