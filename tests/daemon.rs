//! End-to-end: the real `herdd` binary driven over HTTP.

mod common;

use std::time::Duration;

use common::*;
use herd_client::{Client, ClientError};
use serde_json::json;

#[test]
fn auth_limits_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let good = d.client();
    assert!(good.health().unwrap()["ok"].as_bool().unwrap());
    // Token file is owner-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    for bad in [Client::new(&d.addr, ""), Client::new(&d.addr, "wrong")] {
        assert!(matches!(bad.experiments(), Err(ClientError::Unauthorized)));
    }
    // Oversized and malformed bodies: 4xx with a reason, nothing recorded.
    let before = good.status().unwrap()["head_seq"].as_u64().unwrap();
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    // Announce a 9 MiB JSON body: refused from the headers alone.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(d.addr.trim_start_matches("http://")).unwrap();
        write!(s, "POST /experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", token.trim(), 9 * 1024 * 1024).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
    let agent = ureq::agent();
    let resp = agent
        .post(&format!("{}/jobs", d.addr))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_string("{not json");
    match resp {
        Err(ureq::Error::Status(400, r)) => {
            assert!(r.into_string().unwrap().contains("invalid JSON"))
        }
        other => panic!("expected 400, got {other:?}"),
    }
    match good.post(
        "/jobs",
        &req("sft", &[("model", "nothex")], json!({"lr": 1e-5})),
    ) {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(
            message.contains("data") || message.contains("model"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    match good.post("/jobs", &req("sft", &[], json!({"lrr": 1}))) {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(message.contains("lrr"), "{message}"),
        other => panic!("{other:?}"),
    }
    let bad_data = dir.path().join("bad.jsonl");
    std::fs::write(&bad_data, "{\"prompt\": \"x\"}\n").unwrap();
    match good.import_dataset(&bad_data, "sft", "bad") {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(
            message.contains("line 1") && message.contains("completion"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        good.status().unwrap()["head_seq"].as_u64().unwrap(),
        before,
        "nothing recorded by refused requests"
    );
}

#[test]
fn every_job_kind_runs_over_http_and_lineage_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let (r, p, rm, prefs, sft) = import_fixtures(&c);
    let prompts_file = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts_file, "{\"prompt\": \"Compute 17 + 25.\", \"answer\": 42}\n{\"prompt\": \"Compute 1 + 2.\", \"answer\": 3}\n").unwrap();
    let prompts = c
        .import_dataset(&prompts_file, "prompts", "prompts")
        .unwrap()
        .hash;
    let run = |kind: &str, inputs: &[(&str, &str)], hp: serde_json::Value| {
        let id = c.post("/jobs", &req(kind, inputs, hp)).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let j = c.wait(&id, Duration::from_secs(300)).unwrap();
        assert_eq!(
            j.status,
            herd_client::JobStatus::Succeeded,
            "{kind}: {:?}",
            j.error
        );
        j
    };
    let sft_job = run(
        "sft",
        &[("model", &r), ("data", &sft)],
        json!({"steps": 2, "batch_size": 3}),
    );
    let ckpt = sft_job.outputs["checkpoint"].clone();
    run(
        "dpo",
        &[("model", &p), ("reference", &r), ("data", &prefs)],
        json!({"steps": 1, "batch_size": 3}),
    );
    run(
        "rm",
        &[("model", &r), ("data", &prefs)],
        json!({"steps": 1}),
    );
    run(
        "sample",
        &[("policy", &r), ("rm", &rm), ("prompts", &prompts)],
        json!({"k": 2, "max_new_tokens": 4}),
    );
    run("average", &[("a", &r), ("b", &p)], json!({}));
    run("curate", &[("data", &prefs)], json!({}));
    run(
        "eval",
        &[
            ("policy", &p),
            ("baseline", &r),
            ("rm", &rm),
            ("prompts", &prompts),
            ("sft", &sft),
        ],
        json!({"max_new_tokens": 4}),
    );
    let ann = c
        .post(
            "/jobs",
            &req(
                "annotate",
                &[("policy", &r), ("prompts", &prompts)],
                json!({"max_new_tokens": 4}),
            ),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let j = c.wait(&ann, Duration::from_secs(300)).unwrap();
    assert!(
        j.status == herd_client::JobStatus::Succeeded
            || j.error.as_deref().unwrap_or("").contains("could not rank"),
        "{j:?}"
    );
    // Lineage of the SFT checkpoint goes back to the imported model and data.
    let l = c.lineage(&ckpt).unwrap();
    let job = l.job.as_ref().expect("produced by a job");
    assert_eq!(job.kind, herd_client::JobKind::Sft);
    assert_eq!(job.inputs["model"].hash, r.as_str());
    assert_eq!(
        job.inputs["data"].artifact,
        Some(herd_client::ArtifactKind::Sft)
    );
    // Export round-trips: importing the exported directory gives the same tree.
    let out = dir.path().join("export");
    c.export(&ckpt, &out).unwrap();
    assert_eq!(c.import_model(&out, "again").unwrap().hash.as_str(), ckpt);
    assert!(c.verify().unwrap().ok);
}

#[test]
fn cancel_and_a_killed_worker_fail_only_their_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--cpu-jobs", "2"]);
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    let long = json!({"steps": 1000000, "batch_size": 3});
    let a = c
        .post(
            "/jobs",
            &req("sft", &[("model", &r), ("data", &sft)], long.clone()),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = c
        .post("/jobs", &req("sft", &[("model", &r), ("data", &sft)], long))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for id in [&a, &b] {
        for _ in 0..600 {
            if c.job(id).unwrap().last_metrics.contains_key("loss") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let t = std::time::Instant::now();
    c.cancel(&a).unwrap();
    let ja = c.wait(&a, Duration::from_secs(10)).unwrap();
    assert_eq!(ja.status, herd_client::JobStatus::Cancelled);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        t.elapsed()
    );
    let pid = worker_pid(&b).expect("worker process of b");
    unsafe_kill(pid, 9);
    let jb = c.wait(&b, Duration::from_secs(10)).unwrap();
    assert_eq!(jb.status, herd_client::JobStatus::Failed);
    assert!(jb.error.as_deref().unwrap().contains("signal 9"));
    assert!(c.health().is_ok(), "daemon survives");
    assert!(matches!(
        c.cancel(&a),
        Err(ClientError::Api { status: 409, .. })
    ));
}

/// A cancel can land at any moment of a job's start: queued, claimed, its
/// inputs being laid out, its worker spawning. Whenever it lands the job
/// ends cancelled, and no worker runs on for a job recorded cancelled.
#[test]
fn a_cancel_at_any_moment_of_the_start_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &["--cpu-jobs", "2"]);
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    for delay_ms in [0u64, 0, 1, 2, 5, 10, 20, 40, 80, 160] {
        let id = submit_endless_sft(&c, &r, &sft);
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.cancel(&id).unwrap();
        let j = c.wait(&id, Duration::from_secs(30)).unwrap();
        assert_eq!(
            j.status,
            herd_client::JobStatus::Cancelled,
            "cancelled {delay_ms} ms after submit"
        );
    }
    // Both slots are free again: a short job runs.
    let id = submit(
        &c,
        &req("sft", &[("model", &r), ("data", &sft)], json!({"steps": 1})),
    );
    let j = c.wait(&id, Duration::from_secs(60)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
}

#[test]
fn sigkilled_daemon_requeues_and_completes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    let id = c
        .post(
            "/jobs",
            &req(
                "sft",
                &[("model", &r), ("data", &sft)],
                json!({"steps": 300, "batch_size": 3}),
            ),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..600 {
        if c.job(&id).unwrap().status == herd_client::JobStatus::Running {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill the daemon once the first attempt has logged some steps.
    for _ in 0..600 {
        if c.metrics(&id, &["loss"])
            .unwrap()
            .get("loss")
            .is_some_and(|l| l.len() >= 3)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    // The orphaned worker dies on its closed stdout; the job restarts.
    let d2 = Daemon::start(dir.path());
    let c2 = d2.client();
    let j = c2.wait(&id, Duration::from_secs(300)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
    assert!(j.attempts >= 2, "attempts {}", j.attempts);
    assert!(c2.verify().unwrap().ok);
    // The curves are the latest attempt's alone: every step once, in order.
    let loss = &c2.metrics(&id, &["loss"]).unwrap()["loss"];
    let steps: Vec<u64> = loss.iter().map(|(s, _)| *s).collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "steps repeat or go back: {steps:?}"
    );
    assert_eq!(
        steps.len() as u64,
        300,
        "one point per step of the last attempt"
    );
    // The first attempt's points are still there, asked for by number.
    let first = c2.metrics_of_attempt(&id, &["loss"], Some(1)).unwrap();
    assert!(first
        .get("loss")
        .is_some_and(|l| !l.is_empty() && l.len() < 300));
}

#[test]
fn sigterm_stops_cleanly_with_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    d.client().create_experiment("x", "").unwrap();
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    let d2 = Daemon::start(dir.path());
    assert_eq!(d2.client().experiments().unwrap().len(), 1);
}

#[test]
fn hundred_concurrent_clients_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let run = c.open_run("external", None, &json!({"lr": 3e-4})).unwrap();
    const CLIENTS: usize = 100;
    const BATCHES: usize = 5;
    const POINTS: usize = 20;
    std::thread::scope(|s| {
        for i in 0..CLIENTS {
            let (addr, token, run) = (
                d.addr.clone(),
                std::fs::read_to_string(dir.path().join("token")).unwrap(),
                run.clone(),
            );
            s.spawn(move || {
                let c = Client::new(&addr, token.trim());
                for b in 0..BATCHES {
                    let name = format!("m{i}");
                    let pts: Vec<(u64, &str, f64)> = (0..POINTS)
                        .map(|k| ((b * POINTS + k) as u64, name.as_str(), k as f64))
                        .collect();
                    c.log_metrics(&run, &pts).unwrap();
                    c.jobs(&herd_client::JobQuery {
                        kind: Some(herd_client::JobKind::External),
                        ..Default::default()
                    })
                    .unwrap();
                }
            });
        }
    });
    let series = c.metrics(&run, &[]).unwrap();
    assert_eq!(series.len(), CLIENTS);
    assert!(series.values().all(|s| s.len() == BATCHES * POINTS));
    c.close_run(&run, true, "done").unwrap();
    assert_eq!(
        c.job(&run).unwrap().status,
        herd_client::JobStatus::Succeeded
    );
    assert!(c.verify().unwrap().ok);
}
