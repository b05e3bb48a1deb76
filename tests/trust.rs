//! The record can be trusted: auth can't be switched off by accident, hostile
//! input can't poison history, slow clients can't lock anyone out, bytes are
//! verified where they are used, and reproduction says what it compared.
//! Each test is one of the failures the outside attack found (RELIABILITY.md).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use herd_client::{Client, ClientError};
use serde_json::{json, Value};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A 400 whose message says `want`.
fn refused(res: Result<Value, ClientError>, want: &str) {
    let (status, message) = api_error(res);
    assert_eq!(status, 400, "{message}");
    assert!(message.contains(want), "expected {want:?} in {message}");
}

fn api_error(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn auth_cannot_be_switched_off_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    // An empty token file (what a first start on a full disk used to leave)
    // is replaced by a real token; auth stays on.
    std::fs::write(data.join("token"), "").unwrap();
    std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o600)).unwrap();
    {
        let d = Daemon::start(&data);
        let token = std::fs::read_to_string(data.join("token")).unwrap();
        assert_eq!(token.len(), 64, "a fresh 256-bit token");
        assert!(matches!(
            Client::new(&d.addr, "").experiments(),
            Err(ClientError::Unauthorized)
        ));
        d.client().experiments().unwrap();
        // Owner-only: the directory, the token, the log.
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("token")), 0o600);
        assert_eq!(mode(&data.join("log").join("events.jsonl")) & 0o077, 0);
        // No server paths to clients.
        let status = d.client().status().unwrap();
        assert!(
            !status.to_string().contains(data.to_str().unwrap()),
            "{status}"
        );
        // A second daemon on the same directory says who holds it.
        let (code, err) = herdd_refuses(&data, &[]);
        assert_ne!(code, 0);
        assert!(
            err.contains(&format!("another herdd (pid {})", d.child.id())),
            "{err}"
        );
    }
    // Tokens that are not real tokens are refused, saying why.
    for (content, why) in [
        ("   \n", "usable token"),
        ("x", "usable token"),
        ("short-token", "usable token"),
        (
            "has spaces in the middle of a long enough token!!",
            "usable token",
        ),
    ] {
        std::fs::write(data.join("token"), content).unwrap();
        let (code, err) = herdd_refuses(&data, &[]);
        assert_ne!(code, 0, "{content:?}");
        assert!(err.contains(why), "{content:?}: {err}");
    }
    // A good token readable by the group is refused too.
    std::fs::write(data.join("token"), "a".repeat(64)).unwrap();
    std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let (_, err) = herdd_refuses(&data, &[]);
    assert!(err.contains("readable by others"), "{err}");
    // Plain HTTP off the machine needs an explicit flag.
    let (code, err) = herdd_refuses(&data, &["--listen", "0.0.0.0:0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--allow-remote"), "{err}");
}

#[test]
fn hostile_requests_are_refused_and_history_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let (r, _, rm, prefs, sft) = import_fixtures(&c);
    let (r, rm, prefs, sft) = (r.as_str(), rm.as_str(), prefs.as_str(), sft.as_str());
    let before = c.status().unwrap()["head_seq"].as_u64().unwrap();
    // Hyperparameters nested 126 deep: refused, and history still reads.
    let mut deep = json!(1);
    for _ in 0..126 {
        deep = json!({ "a": deep });
    }
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let resp = ureq::post(&format!("{}/runs", d.addr))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_json(json!({"name": "deep", "hyperparameters": deep}));
    match resp {
        Err(ureq::Error::Status(400, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains("nested"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    // Out of range: refused at submit, naming the field and the bounds.
    for (kind, inputs, hp, field) in [
        (
            "sft",
            vec![("model", r), ("data", sft)],
            json!({"steps": u64::MAX}),
            "steps",
        ),
        (
            "sft",
            vec![("model", r), ("data", sft)],
            json!({"batch_size": 1_000_000_000_000u64}),
            "batch_size",
        ),
        (
            "sft",
            vec![("model", r), ("data", sft)],
            json!({"max_seq_len": 10_000_000}),
            "max_seq_len",
        ),
        (
            "dpo",
            vec![("model", r), ("data", prefs)],
            json!({"grad_accum": 1_000_000}),
            "grad_accum",
        ),
        (
            "eval",
            vec![("policy", r)],
            json!({"max_new_tokens": 10_000_000}),
            "max_new_tokens",
        ),
    ] {
        let (status, msg) = api_error(c.post("/jobs", &req(kind, &inputs, hp)));
        assert_eq!(status, 400, "{msg}");
        assert!(
            msg.contains(field) && msg.contains("must be in"),
            "{field}: {msg}"
        );
    }
    // Wrong kinds of input: refused at submit, not at run time.
    for (kind, inputs, says) in [
        (
            "sft",
            vec![("model", sft), ("data", sft)],
            "input `model` of a sft job must be a checkpoint",
        ),
        (
            "sft",
            vec![("model", r), ("data", prefs)],
            "input `data` of a sft job must be a sft",
        ),
        (
            "average",
            vec![("a", r), ("b", sft)],
            "must be a checkpoint",
        ),
        (
            "sample",
            vec![("policy", r), ("rm", rm), ("prompts", sft)],
            "must be a prompts",
        ),
    ] {
        let (status, msg) = api_error(c.post("/jobs", &req(kind, &inputs, json!({}))));
        assert_eq!(status, 400, "{msg}");
        assert!(msg.contains(says), "{kind}: {msg}");
    }
    let upper = r.to_uppercase();
    let (_, msg) = api_error(c.post(
        "/jobs",
        &req("sft", &[("model", &upper), ("data", sft)], json!({})),
    ));
    assert!(msg.contains("lowercase"), "{msg}");
    // Inside round specs too: a garbage job reference, a wrong kind.
    let exp = c.create_experiment("trust", "").unwrap();
    for (vars, says) in [
        (json!({"policy": "job:garbage"}), "job:garbage"),
        (json!({"policy": sft}), "must be a checkpoint"),
    ] {
        let spec = json!({
            "experiment": exp,
            "vars": vars,
            "jobs": [{"name": "s", "kind": "sft", "inputs": {"model": "$policy", "data": sft}}],
        });
        let (status, msg) = api_error(c.post("/rounds", &spec));
        assert_eq!(status, 400, "{msg}");
        assert!(msg.contains(says), "{msg}");
    }
    // A curate output keeps its input's kind: preference data can't feed sft.
    let spec = json!({
        "experiment": exp,
        "jobs": [
            {"name": "c", "kind": "curate", "inputs": {"data": prefs}},
            {"name": "s", "kind": "sft", "inputs": {"model": r, "data": "c.data"}},
        ],
    });
    let (_, msg) = api_error(c.post("/rounds", &spec));
    assert!(
        msg.contains("must be a sft") && msg.contains("preference"),
        "{msg}"
    );
    // A body shorter than its Content-Length: a JSON 400 that says so.
    {
        let mut s = std::net::TcpStream::connect(d.addr.trim_start_matches("http://")).unwrap();
        write!(
            s,
            "POST /experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":",
            token.trim()
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("ended before its Content-Length"),
            "{answer}"
        );
    }
    // Requests hyper cannot parse get the JSON error body too.
    for raw in [
        "NOT A REQUEST LINE\r\n\r\n".to_string(),
        format!(
            "POST /experiments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: abc\r\n\r\n",
            token.trim()
        ),
    ] {
        let mut s = std::net::TcpStream::connect(d.addr.trim_start_matches("http://")).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw:?}: {answer}");
        assert!(answer.contains("{\"error\":"), "{raw:?}: {answer}");
    }
    // Nothing refused was recorded (one experiment was), and everything reads.
    assert_eq!(
        c.status().unwrap()["head_seq"].as_u64().unwrap(),
        before + 1
    );
    c.jobs(&Default::default()).unwrap();
    // Following the event stream (what `herd watch` does) reads every event.
    let head = c.status().unwrap()["head_seq"].as_u64().unwrap();
    let mut seen = 0;
    c.follow_events(1, |e| {
        seen += 1;
        e["seq"].as_u64() != Some(head)
    })
    .unwrap();
    assert_eq!(seen, head);
}

#[test]
fn idle_connections_cannot_lock_clients_out() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let addr = d.addr.trim_start_matches("http://").to_string();
    // 1,100 connections that never finish a request (half send part of one).
    let mut idle = vec![];
    for i in 0..1100 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        idle.push(s);
    }
    let t = Instant::now();
    c.status().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        t.elapsed()
    );
    // The server closes them once their head is overdue.
    let first = &mut idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let n = first.read(&mut buf).unwrap_or(0);
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "idle connection kept {:?}",
        t.elapsed()
    );
    let _ = n; // hyper may answer 408 or just close
}

/// 1,100 sockets need more descriptors than some shells give a process.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn reproduction_says_whether_the_environment_differed() {
    let dir = tempfile::tempdir().unwrap();
    let job = {
        let d = Daemon::start_with(dir.path(), &["--threads", "1"]);
        let c = d.client();
        let (r, _, _, _, sft) = import_fixtures(&c);
        let j = run_short_sft(&c, &r, &sft);
        // The fingerprint says what can change the numbers.
        for key in ["engine_version", "kernel_path", "threads", "device"] {
            assert!(j.fingerprint.contains_key(key), "{:?}", j.fingerprint);
        }
        assert!(
            j.fingerprint["engine_version"].contains("+src."),
            "{:?}",
            j.fingerprint
        );
        j.id
    };
    // Same data, a different thread count on purpose.
    let d = Daemon::start_with(dir.path(), &["--threads", "2"]);
    let out = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "--server",
            &d.addr,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .args(["reproduce", &job.to_string(), "--json"])
        .env_remove("HERD_TOKEN")
        .env_remove("HERD_SERVER")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let r = &report["jobs"][0];
    assert_eq!(r["same_environment"], false, "{report}");
    assert_eq!(
        r["environment_differences"]["threads"]["original"], "1",
        "{report}"
    );
    assert_eq!(
        r["environment_differences"]["threads"]["reproduction"], "2",
        "{report}"
    );
}

/// A tmpfs of `size` at a fresh directory, unmounted on drop (needs root).
/// Jobs that could only record unusable outputs are refused at submit,
/// naming the field: a learning rate past 1 (`lr=1e308` used to train
/// every weight to infinity and succeed), average weights whose sum
/// overflows (`[1e308, 1e308]` used to give all-zero weights) or that do
/// not match the inputs (`[1]` for two used to fail only at start).
#[test]
fn jobs_that_would_record_unusable_outputs_are_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let (r, p, _, _, sft) = import_fixtures(&c);
    let refused = |body: Value, want: &[&str]| {
        let (status, message) = api_error(c.post("/jobs", &body));
        assert_eq!(status, 400, "{message}");
        for w in want {
            assert!(message.contains(w), "expected {w:?} in {message}");
        }
    };
    refused(
        req(
            "sft",
            &[("model", &r), ("data", &sft)],
            json!({"lr": 1e308, "steps": 1}),
        ),
        &["lr", "(0, 1]"],
    );
    refused(
        req(
            "average",
            &[("a", &r), ("b", &p)],
            json!({"weights": [1e308, 1e308]}),
        ),
        &["weights", "finite and positive"],
    );
    refused(
        req(
            "average",
            &[("a", &r), ("b", &p)],
            json!({"weights": [1.0]}),
        ),
        &["weights", "1 weight(s) for 2 inputs"],
    );
    // At the top of the range a job still runs.
    run_short_sft(&c, &r, &sft);
    let ok = submit(
        &c,
        &req(
            "average",
            &[("a", &r), ("b", &p)],
            json!({"weights": [1.0, 3.0]}),
        ),
    );
    let j = c.wait(&ok, Duration::from_secs(60)).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded, "{:?}", j.error);
}

/// `herdd --data-dir rel/rd`: the directory is made absolute at start, so
/// the links an import makes to blobs resolve and a model imports (it used
/// to fail with "I/O error on DATA/tmp/…/config.json").
#[test]
fn a_relative_data_dir_imports_models() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_relative(dir.path(), "rel/rd");
    let c = d.client();
    let imported = c.import_model(&fixtures().join("ref"), "ref").unwrap();
    assert!(imported.summary["parameters"].as_u64().unwrap() > 0);
    assert!(dir.path().join("rel/rd/log/events.jsonl").is_file());
}

/// Queries and runs that used to be answered 200 with a wrong or empty
/// result: an unknown sort or where key, too many rows, a run's
/// hyperparameters as a list, a run output whose blob is not what it claims.
#[test]
fn unknown_keys_oversized_rows_and_mislabelled_run_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    run_short_sft(&c, &r, &sft);
    refused(c.get("/jobs?sort=bogus"), "no job has `bogus`");
    refused(c.get("/jobs?sort=-metric.reward_acc"), "metric.reward_acc");
    refused(c.get("/jobs?where=metric.los%3C2"), "metric.los");
    assert!(c.get("/jobs?sort=-metric.loss").is_ok());
    refused(
        c.get(&format!("/artifacts/{sft}?rows=101")),
        "at most 100 rows",
    );
    assert!(c.get(&format!("/artifacts/{sft}?rows=100")).is_ok());

    refused(
        c.post("/runs", &json!({"name": "r", "hyperparameters": [1, 2]})),
        "hyperparameters",
    );
    let run = c
        .post(
            "/runs",
            &json!({"name": "r", "hyperparameters": {"lr": 1e-5}}),
        )
        .unwrap();
    let id = run["id"].as_str().unwrap().to_string();
    let blob = c.upload_file(&fixtures().join("sft.jsonl")).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    refused(
        c.post(
            &format!("/runs/{id}/artifacts"),
            &json!({"name": "checkpoint", "hash": blob, "artifact": "checkpoint"}),
        ),
        "not a checkpoint",
    );
    refused(
        c.post(
            &format!("/runs/{id}/artifacts"),
            &json!({"name": "prefs", "hash": blob, "artifact": "preference"}),
        ),
        "not a preference dataset",
    );
    c.post(
        &format!("/runs/{id}/artifacts"),
        &json!({"name": "data", "hash": blob, "artifact": "sft"}),
    )
    .unwrap();
}

/// Names are text people read: control characters (a name with ESC could
/// clear a screen or retitle a terminal), bidirectional overrides,
/// padding and over-long names are refused, naming the character.
#[test]
fn names_with_escapes_controls_or_overrides_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    refused(
        c.post("/experiments", &json!({"name": "x\u{1b}]0;pwned\u{7}"})),
        "U+001B",
    );
    refused(
        c.post("/experiments", &json!({"name": " padded"})),
        "spaces",
    );
    refused(
        c.post("/experiments", &json!({"name": "a".repeat(201)})),
        "200",
    );
    refused(c.post("/runs", &json!({"name": "two\nlines"})), "U+000A");
    let (r, _, _, _, sft) = import_fixtures(&c);
    let mut body = req("sft", &[("model", &r), ("data", &sft)], json!({"steps": 1}));
    body["name"] = json!("evil\u{202E}gnp.exe");
    refused(c.post("/jobs", &body), "U+202E");
    let run = c.post("/runs", &json!({"name": "ok"})).unwrap();
    let id = run["id"].as_str().unwrap();
    refused(
        c.post(
            &format!("/runs/{id}/metrics"),
            &json!({"points": [{"name": "loss\u{0}", "step": 1, "value": 1.0}]}),
        ),
        "U+0000",
    );
    c.post("/experiments", &json!({"name": "fine name ✓"}))
        .unwrap();
}

/// A token holder can't lock everyone out with bodies that never come:
/// 4,200 connections send a request head for a large upload and then stall.
/// At most 64 bodies per client are read at once (the rest are refused at
/// once, 503, and closed), and a read body must bring 1 KiB every 10 s or
/// get 408: `/status` keeps answering (it used to answer 503 for as long as
/// the stalled bodies stayed).
#[test]
fn stalled_request_bodies_cannot_lock_clients_out() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let addr = d.addr.trim_start_matches("http://").to_string();
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let head = format!(
        "POST /blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\nten bytes.",
        token.trim()
    );
    let mut stalled = vec![];
    for _ in 0..4200 {
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            break; // the client ran out of descriptors: enough of them
        };
        let _ = s.write_all(head.as_bytes());
        stalled.push(s);
    }
    assert!(stalled.len() >= 2000, "opened only {}", stalled.len());
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        c.status().expect("/status answers while bodies stall");
        worst = worst.max(t.elapsed());
    }
    eprintln!(
        "{} stalled bodies: /status worst of 5 {worst:?}",
        stalled.len()
    );
    assert!(worst < Duration::from_secs(5), "status took {worst:?}");
    // Every stalled connection ends: refused at the gate at once, or timed
    // out with 408 once its window passes.
    let (mut refused, mut timed_out) = (0, 0);
    for s in stalled.iter_mut().take(200) {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 503") {
            refused += 1;
        } else if out.starts_with("HTTP/1.1 408") {
            timed_out += 1;
        } else {
            panic!("unexpected answer to a stalled body: {out:?}");
        }
    }
    assert!(
        timed_out > 0 && refused > 0,
        "408: {timed_out}, 503: {refused}"
    );
    assert!(
        timed_out <= 64,
        "at most 64 bodies per client are read at once"
    );
}
