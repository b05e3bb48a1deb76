//! herdd on a big history: 100k finished jobs and 10M metric points.
//!
//! Builds the data directory through the store (the events a real daemon
//! records: a job's submission, start with effective hyperparameters and
//! fingerprint, one metric event per step with five metrics, an output and
//! success), then starts the real `herdd` binary on it and measures what the
//! issue asks for: restart time (spawn to listening), the daemon's resident
//! memory, a 20k-point series read, history queries over every job, and
//! curves at scale: a 10M-point series sampled for a chart, a job page of
//! ten 1M-point series and a compare of 200 jobs in headless Chromium.
//!
//! Run: `cargo bench --bench scale_bench` (SCALE_JOBS, SCALE_STEPS change the
//! size, SCALE_DIR keeps the data directory for the next run; the defaults are 100,000 jobs x 20 steps x 5 metrics, plus one job
//! of 20,000 steps).

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd_client::Client;
use herd_core::model::{streams, HerdEvent, MetricPoint};
use herd_core::wire::JobQuery;
use herd_core::{ArtifactKind, JobKind};
use herd_daemon::state::new_event;
use herd_store::{ExpectedVersion, NewEvent, Store};
use serde_json::json;
use uuid::Uuid;

const METRICS: [&str; 5] = ["loss", "lr", "grad_norm", "tokens_per_s", "reward_accuracy"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every event of one finished job with `steps` metric steps.
fn job_events(job: Uuid, experiment: Uuid, i: usize, steps: usize) -> Vec<NewEvent> {
    let kind = [JobKind::Sft, JobKind::Dpo, JobKind::Rm][i % 3];
    let lr = [1e-5, 2e-5, 5e-5, 1e-4][i % 4];
    let hp = json!({"lr": lr, "epochs": 1, "batch_size": 4});
    let effective = json!({
        "lr": lr, "epochs": 1, "batch_size": 4, "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "max_len": 512, "beta": 0.1, "nll_weight": 0.2,
        "schedule": "cosine", "min_lr_ratio": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_eps": 1e-8, "seed": i,
    });
    let mut events = vec![
        HerdEvent::JobSubmitted {
            job,
            experiment: Some(experiment),
            round: None,
            name: format!("{}-{i}", kind.as_str()),
            kind,
            inputs: [
                ("model".to_string(), "a".repeat(64)),
                ("data".to_string(), "b".repeat(64)),
            ]
            .into(),
            hyperparameters: hp,
            seed: i as u64,
            depends_on: vec![],
            priority: 0,
            reproduces: None,
            resources: Default::default(),
        },
        HerdEvent::JobStarted {
            job,
            attempt: 1,
            device: "cpu".into(),
            pid: Some(1000 + i as u32),
            executor: None,
            slurm_job: None,
            engine_version: herd_engine::ENGINE_VERSION.into(),
            threads: 2,
            resolved_inputs: [
                ("model".to_string(), "a".repeat(64)),
                ("data".to_string(), "b".repeat(64)),
            ]
            .into(),
            effective_hyperparameters: effective,
            fingerprint: herd_engine::fingerprint("cpu", 2),
        },
    ];
    for step in 1..=steps {
        let points = METRICS
            .iter()
            .enumerate()
            .map(|(m, name)| MetricPoint {
                step: step as u64,
                name: name.to_string(),
                value: (1.0 + m as f64) / (step as f64 + (i % 97) as f64),
            })
            .collect();
        events.push(HerdEvent::JobMetrics {
            job,
            attempt: 1,
            points,
        });
    }
    events.push(HerdEvent::JobOutput {
        job,
        name: "checkpoint".into(),
        hash: format!("{:064x}", i),
        artifact: ArtifactKind::Checkpoint,
        summary: json!({}),
    });
    events.push(HerdEvent::JobSucceeded {
        job,
        summary: json!({"steps": steps}),
    });
    events.iter().map(new_event).collect()
}

/// A finished job whose metric events carry `steps` points of each series
/// in `names`, 1,000 points an event.
fn curve_events(
    job: Uuid,
    experiment: Uuid,
    i: usize,
    names: &[&str],
    steps: usize,
) -> Vec<NewEvent> {
    let mut events = job_events(job, experiment, i, 0);
    let ends = events.split_off(events.len() - 2);
    let per_event = (1000 / names.len()).max(1);
    for first in (1..=steps).step_by(per_event) {
        let points = (first..=(first + per_event - 1).min(steps))
            .flat_map(|step| {
                names.iter().enumerate().map(move |(m, name)| MetricPoint {
                    step: step as u64,
                    name: name.to_string(),
                    // A noisy decay with a spike now and then.
                    value: if step % 99_991 == 0 {
                        10.0
                    } else {
                        (1.0 + m as f64) / (1.0 + step as f64).sqrt()
                            + ((step * 7919 + i) % 101) as f64 / 1e3
                    },
                })
            })
            .collect();
        events.push(new_event(&HerdEvent::JobMetrics {
            job,
            attempt: 1,
            points,
        }));
    }
    events.extend(ends);
    events
}

/// The jobs the curve measures read: one 10M-point series, one job of ten
/// 1M-point series, 200 jobs of 10k points. Ids kept in `DATA/curves`.
struct Curves {
    long: Uuid,
    wide: Uuid,
    many: Vec<Uuid>,
}

const LONG: usize = 10_000_000;
const WIDE: usize = 1_000_000;
const MANY: usize = 200;
const MANY_STEPS: usize = 10_000;
const SERIES: [&str; 10] = [
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "reward_accuracy",
    "kl",
    "entropy",
    "reward_mean",
    "reward_std",
    "clip_low",
];

fn write_curves(log: &herd_store::EventLog, experiment: Uuid, data: &std::path::Path) -> Curves {
    let t = Instant::now();
    let c = Curves {
        long: Uuid::now_v7(),
        wide: Uuid::now_v7(),
        many: (0..MANY).map(|_| Uuid::now_v7()).collect(),
    };
    let write = |job: Uuid, events: Vec<NewEvent>| {
        for part in events.chunks(1024) {
            log.append(&streams::job(job), ExpectedVersion::Any, part.to_vec())
                .unwrap();
        }
    };
    write(c.long, curve_events(c.long, experiment, 1, &["loss"], LONG));
    write(c.wide, curve_events(c.wide, experiment, 2, &SERIES, WIDE));
    for (k, &job) in c.many.iter().enumerate() {
        write(
            job,
            curve_events(job, experiment, 3 + k, &["loss"], MANY_STEPS),
        );
    }
    let ids: Vec<String> = [c.long, c.wide]
        .iter()
        .chain(&c.many)
        .map(|u| u.to_string())
        .collect();
    std::fs::write(data.join("curves"), ids.join("\n")).unwrap();
    println!(
        "curves: {} points more, written in {:.1} s",
        LONG + 10 * WIDE + MANY * MANY_STEPS,
        t.elapsed().as_secs_f64()
    );
    c
}

fn read_curves(data: &std::path::Path) -> Curves {
    let ids: Vec<Uuid> = std::fs::read_to_string(data.join("curves"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    Curves {
        long: ids[0],
        wide: ids[1],
        many: ids[2..].to_vec(),
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[runs / 2], times[runs - 1])
}

fn main() {
    let jobs = env_usize("SCALE_JOBS", 100_000);
    let steps = env_usize("SCALE_STEPS", 20);
    let big_steps = 20_000;
    // SCALE_DIR keeps the data directory (and reuses it when it exists).
    let tmp = tempfile::tempdir().unwrap();
    let data = match std::env::var_os("SCALE_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => tmp.path().join("data"),
    };
    let reuse = data.join("log").join("events.jsonl").exists();

    // 1. The history, written as a daemon would have recorded it.
    let t = Instant::now();
    let big_job_file = data.join("big_job");
    let big_job = match std::fs::read_to_string(&big_job_file) {
        Ok(id) if reuse => id.trim().parse().unwrap(),
        _ => Uuid::now_v7(),
    };
    if !reuse {
        let store = Store::open(&data).unwrap();
        let log = &store.log;
        let experiment = Uuid::now_v7();
        let created = HerdEvent::ExperimentCreated {
            experiment,
            name: "scale".into(),
            description: String::new(),
        };
        log.append(
            &streams::experiment(experiment),
            ExpectedVersion::Any,
            vec![new_event(&created)],
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        // Many appends in flight: the writer commits them in groups.
        let ids: Vec<Uuid> = (0..jobs).map(|_| Uuid::now_v7()).collect();
        for chunk in ids.chunks(512).enumerate() {
            let (c, chunk) = chunk;
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for (k, &job) in chunk.iter().enumerate() {
                    let i = c * 512 + k;
                    let log = log.clone();
                    tasks.spawn(async move {
                        let events = job_events(job, experiment, i, steps);
                        log.append_async(&streams::job(job), ExpectedVersion::Any, events)
                            .await
                            .unwrap();
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.unwrap();
                }
            });
        }
        let events = job_events(big_job, experiment, jobs, big_steps);
        for part in events.chunks(4096) {
            log.append(&streams::job(big_job), ExpectedVersion::Any, part.to_vec())
                .unwrap();
        }
        println!(
            "history: {} jobs, {} metric points, {} events, written in {:.1} s",
            jobs + 1,
            (jobs * steps + big_steps) * METRICS.len(),
            log.head_seq(),
            t.elapsed().as_secs_f64()
        );
        std::fs::write(&big_job_file, big_job.to_string()).unwrap();
        write_curves(log, experiment, &data);
    }
    let curves = read_curves(&data);
    // Every job: the history's, the 20k-step one, the curves'.
    let all = jobs + 1 + 2 + curves.many.len();
    let log_bytes = std::fs::metadata(data.join("log").join("events.jsonl"))
        .unwrap()
        .len();
    println!("log file: {:.0} MiB", log_bytes as f64 / (1 << 20) as f64);

    // 2. The first start on this history folds the whole log and writes
    // the views; a restart loads them.
    let (mut child, _, first) = start_herdd(&data);
    println!(
        "first start (builds DATA/views from the whole log): {:.2} s",
        first.as_secs_f64()
    );
    let (rss, hwm) = rss_kib(child.id());
    println!(
        "daemon memory after the first start: RSS {:.0} MiB (peak {:.0} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    stop(&mut child);
    let (mut child, addr, restart) = start_herdd(&data);
    let token = std::fs::read_to_string(data.join("token")).unwrap();
    let c = Client::new(&addr, token.trim());
    println!(
        "restart (spawn to listening): {:.2} s",
        restart.as_secs_f64()
    );
    let (rss, hwm) = rss_kib(child.id());
    println!(
        "daemon memory after restart: RSS {:.0} MiB (peak {:.0} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // 3. A 20k-point series.
    let id = big_job.to_string();
    let (med, max) = median_ms(20, || {
        let s = c.metrics(&id, &["loss"]).unwrap();
        assert_eq!(s["loss"].len(), big_steps);
    });
    println!("a 20k-point series: median {med:.1} ms, max {max:.1} ms");
    let (med, max) = median_ms(20, || {
        let s = c.metrics(&id, &[]).unwrap();
        assert_eq!(s.len(), METRICS.len());
    });
    println!("all 5 series of that job (100k points): median {med:.1} ms, max {max:.1} ms");

    // Curves: a 10M-point series sampled for 2,000 pixels, from its block
    // summaries; and a zoomed window of it.
    let long = curves.long.to_string();
    let (med, max) = median_ms(20, || {
        let s = c
            .sampled_metrics(&long, &["loss"], 2000, None, None)
            .unwrap();
        assert_eq!(s.counts["loss"], LONG as u64);
        assert!(s.series["loss"].len() <= 4003);
    });
    println!("a 10M-point series sampled at N = 2,000: median {med:.1} ms, max {max:.1} ms");
    let (med, max) = median_ms(20, || {
        let s = c
            .sampled_metrics(&long, &["loss"], 2000, Some(4_000_000), Some(6_000_000))
            .unwrap();
        assert_eq!(s.counts["loss"], 2_000_001);
    });
    println!("a 2M-step window of it at N = 2,000: median {med:.1} ms, max {max:.1} ms");

    // 4. History over every job.
    let sorted = JobQuery {
        sort: Some("-metric.loss".into()),
        limit: Some(50),
        ..Default::default()
    };
    let (med, max) = median_ms(20, || {
        assert_eq!(c.jobs(&sorted).unwrap().len(), 50);
    });
    println!("history over {all} jobs, sorted by -metric.loss, first 50: median {med:.1} ms, max {max:.1} ms");
    let filtered = JobQuery {
        kind: Some(JobKind::Dpo),
        where_: Some("hp.lr<5e-5,metric.loss<0.5".into()),
        sort: Some("hp.lr".into()),
        limit: Some(50),
        ..Default::default()
    };
    let (med, max) = median_ms(20, || {
        c.jobs(&filtered).unwrap();
    });
    println!("history filtered (kind, hp.lr, metric.loss) and sorted, first 50: median {med:.1} ms, max {max:.1} ms");
    let (med, max) = median_ms(3, || {
        assert_eq!(c.jobs(&JobQuery::default()).unwrap().len(), all);
    });
    println!(
        "history, all {all} jobs (the client pages, 1,000 a request): median {med:.0} ms, max {max:.0} ms"
    );

    let (rss, hwm) = rss_kib(child.id());
    println!(
        "daemon memory after the queries: RSS {:.0} MiB (peak {:.0} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // 5. The dashboard on this history, in headless Chromium: from the
    // hash change to the page drawn (the app records it per navigation).
    match common::browser::Browser::start() {
        Err(why) => println!("dashboard: skipped (no headless Chromium: {why})"),
        Ok(b) => {
            let link = c.post("/dashboard/codes", &json!({})).unwrap()["url"]
                .as_str()
                .unwrap()
                .to_string();
            b.goto(&link);
            b.wait_for("#experiments");
            let time_page = |what: &str, hash: &str, drawn: &str| {
                let mut times = vec![];
                for _ in 0..5 {
                    b.js("location.hash = '#/queue'");
                    b.until(
                        "the queue page",
                        Duration::from_secs(60),
                        "return document.body.dataset.page === 'queue'",
                    );
                    b.js(&format!("location.hash = '{hash}'"));
                    b.until(what, Duration::from_secs(60), drawn);
                    let ms: f64 = b
                        .js("return Number(document.body.dataset.renderedMs)")
                        .as_f64()
                        .unwrap();
                    times.push(ms);
                }
                times.sort_by(f64::total_cmp);
                println!(
                    "dashboard: {what}: median {:.0} ms, max {:.0} ms of 5",
                    times[2], times[4]
                );
            };
            time_page(
                "a 20k-point curve (the job page, all 5 series: 100k points)",
                &format!("#/job/{id}"),
                "const c = document.querySelector('#chart-loss'); return document.body.dataset.page === 'job' && !!c && c.dataset.count === '20000' && !!c.querySelector('canvas')",
            );
            time_page(
                "a job page with 10 series of 1M points each",
                &format!("#/job/{}", curves.wide),
                "const c = [...document.querySelectorAll('#charts .chart')]; return document.body.dataset.page === 'job' && c.length === 10 && c.every((e) => e.dataset.count === '1000000' && !!e.querySelector('canvas'))",
            );
            let ids: Vec<String> = curves.many.iter().map(|u| u.to_string()).collect();
            time_page(
                "compare 200 jobs of 10k points each",
                &format!("#/compare?ids={}", ids.join(",")),
                "const c = document.querySelector('#chart-loss'); return document.body.dataset.page === 'compare' && !!c && c.dataset.lines === '200' && c.dataset.count === '2000000'",
            );
            println!(
                "  of which drawing (after the last answer): {} ms; {} points drawn",
                b.js("return document.querySelector('#main > div').dataset.drawMs"),
                b.js("return document.querySelector('#chart-loss').dataset.points")
            );
            time_page(
                &format!("the history page over {all} jobs, first 50"),
                "#/history",
                "return document.body.dataset.page === 'history' && document.querySelectorAll('#history tbody tr').length === 50",
            );
            time_page(
                "the history page sorted by -metric.loss",
                "#/history?sort=-metric.loss",
                "return document.body.dataset.page === 'history' && document.querySelectorAll('#history tbody tr').length === 50",
            );
        }
    }
    stop(&mut child);
}

/// Spawn herdd on `data`; return it, its address and the time to listening.
fn start_herdd(data: &std::path::Path) -> (Child, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herdd"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--threads", "2", "--dashboard-listen", "127.0.0.1:0"])
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
    let took = t.elapsed();
    std::thread::spawn(move || for _ in lines {});
    (child, addr, took)
}

/// SIGTERM and wait (a clean stop saves the views).
fn stop(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
