//! A third executor is one file: this one runs no process at all. It plays
//! a worker's messages from a script chosen by the job's name, and fails
//! on command (refusing to start, losing the attempt, running until it is
//! stopped). The daemon takes it as it takes `local` and `slurm`
//! (`SchedulerConfig::with`), and the scheduler's promises hold with it:
//! messages become events, start failures fail the job with the reason, a
//! lost attempt is run again up to `max_attempts`, cancel stops it, and
//! the record names the executor and the attempt's id there.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use common::*;
use herd_client::{Client, JobStatus};
use herd_core::model::JobView;
use herd_daemon::executor::{
    BoxFuture, Ending, Executor, ExecutorHandle, Follow, Launch, Next, Placement, Started,
};
use herd_daemon::scheduler::SchedulerConfig;
use herd_daemon::server::{Daemon, DaemonConfig};
use serde_json::json;

#[derive(Default)]
struct ScriptedExecutor {
    started: AtomicU32,
}

impl Executor for ScriptedExecutor {
    fn name(&self) -> &'static str {
        "scripted"
    }
    fn slots(&self) -> Vec<String> {
        vec!["scripted".into(); 2]
    }
    fn placement(&self, _job: &JobView, _slot: usize) -> Placement {
        Placement {
            device: "cpu".into(),
            threads: 1,
        }
    }
    fn start<'a>(&'a self, launch: Launch<'a>) -> BoxFuture<'a, Result<Started>> {
        Box::pin(async move {
            let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            let name = launch.job.name.as_str();
            if name == "refused" {
                bail!("the scripted executor refuses jobs named `refused`");
            }
            let metrics = |step: u64| {
                json!({"msg": "metrics", "step": step, "points": [["loss", 1.0 / step as f64]]})
                    .to_string()
            };
            let done = json!({"msg": "done", "summary": {"scripted": true}}).to_string();
            let (lines, ending) = match name {
                // Lost on its first two attempts, fine on the third.
                "flaky" if launch.attempt < 3 => (
                    vec![metrics(1)],
                    Some(Ending::Lost(format!("scripted loss {n}"))),
                ),
                "endless" => (vec![metrics(1)], None),
                _ => (
                    vec![metrics(1), metrics(2), done],
                    Some(Ending::Ended {
                        ok: true,
                        how: "scripted end".into(),
                    }),
                ),
            };
            Ok(Started {
                handle: ExecutorHandle {
                    executor: "scripted".into(),
                    id: n.to_string(),
                },
                pid: None,
                follow: Box::new(Script {
                    lines: lines.into(),
                    ending,
                    stopped: false,
                }),
            })
        })
    }
}

struct Script {
    lines: VecDeque<String>,
    /// None: runs until stopped.
    ending: Option<Ending>,
    stopped: bool,
}

impl Follow for Script {
    fn next(&mut self) -> BoxFuture<'_, Result<Next>> {
        Box::pin(async move {
            if let Some(line) = self.lines.pop_front() {
                return Ok(Next::Line(line));
            }
            loop {
                if self.stopped {
                    return Ok(Next::Ended(Ending::Ended {
                        ok: false,
                        how: "stopped".into(),
                    }));
                }
                if let Some(e) = self.ending.take() {
                    return Ok(Next::Ended(e));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
    fn stop(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.stopped = true })
    }
}

#[test]
fn an_executor_in_one_file_runs_jobs_with_the_schedulers_promises() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let executor = Arc::new(ScriptedExecutor::default());
    let config = DaemonConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        scheduler: SchedulerConfig::with(executor.clone()),
        dashboard: None,
        dashboard_hosts: vec![],
    };
    let daemon = rt.block_on(Daemon::start(config)).unwrap();
    let c = Client::new(&format!("http://{}", daemon.addr), &daemon.token);
    assert_eq!(c.status().unwrap()["executor"], json!("scripted"));
    let (r, _, _, _, sft) = import_fixtures(&c);
    let job = |name: &str| {
        let mut body = req("sft", &[("model", &r), ("data", &sft)], json!({"steps": 2}));
        body["name"] = json!(name);
        submit(&c, &body)
    };

    let ok = c.wait(&job("plain"), Duration::from_secs(30)).unwrap();
    assert_eq!(ok.status, JobStatus::Succeeded, "{:?}", ok.error);
    assert_eq!(
        ok.executor.as_ref().map(|h| h.executor.as_str()),
        Some("scripted")
    );
    assert_eq!(
        c.metrics(&ok.id.to_string(), &["loss"]).unwrap()["loss"],
        vec![(1, 1.0), (2, 0.5)]
    );

    let refused = c.wait(&job("refused"), Duration::from_secs(30)).unwrap();
    assert_eq!(refused.status, JobStatus::Failed);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap()
            .contains("could not start: the scripted executor refuses"),
        "{:?}",
        refused.error
    );

    let flaky = c.wait(&job("flaky"), Duration::from_secs(30)).unwrap();
    assert_eq!(flaky.status, JobStatus::Succeeded, "{:?}", flaky.error);
    assert_eq!(flaky.attempts, 3, "lost twice, requeued each time");

    let endless = job("endless");
    let start = std::time::Instant::now();
    while c.job(&endless).unwrap().status != JobStatus::Running {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the endless job never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.cancel(&endless).unwrap();
    let cancelled = c.wait(&endless, Duration::from_secs(30)).unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    rt.block_on(daemon.shutdown()).unwrap();
}
