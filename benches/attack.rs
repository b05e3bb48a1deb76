//! The outside attack on herdd, rerun at will: kill -9s under concurrent
//! writers, a full disk, hostile requests, stalled request bodies, and load.
//! Each part prints one figure line for RELIABILITY.md and checks what it
//! must (no acknowledged point lost, no 5xx); a broken promise panics.
//!
//! Run: `cargo bench --bench attack` (as root for the full-disk part, which
//! mounts a tmpfs; it says SKIPPED otherwise). `ATTACK_KILLS` (default 20)
//! and `ATTACK_LOAD_SECS` (default 10) size it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herd_client::{Client, ClientError};
use serde_json::{json, Value};

/// herdd on `data`, started as a user would; its address once it listens.
struct Herdd {
    child: Child,
    addr: String,
    token: String,
}

impl Herdd {
    fn start(data: &Path) -> Herdd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herdd"))
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herdd");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("herdd exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("herdd listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("token"))
            .unwrap()
            .trim()
            .to_string();
        Herdd { child, addr, token }
    }
    fn client(&self) -> Client {
        Client::new(&self.addr, &self.token)
    }
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Herdd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// A small deterministic generator: the attack is the same every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writers each log batches of points to their own run until told to stop
/// or a request fails; what each had acknowledged: (run, points).
fn writers(
    h: &Herdd,
    n: usize,
    tag: &str,
    stop: Arc<AtomicBool>,
    per_batch: u64,
) -> Vec<std::thread::JoinHandle<(String, u64, u64)>> {
    (0..n)
        .map(|i| {
            let c = h.client();
            let (stop, name) = (stop.clone(), format!("{tag}-w{i}"));
            std::thread::spawn(move || {
                let run = c.open_run(&name, None, &json!({})).unwrap();
                let (mut acked, mut refused) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let points: Vec<(u64, &str, f64)> = (acked..acked + per_batch)
                        .map(|s| (s, "m", s as f64))
                        .collect();
                    match c.log_metrics(&run, &points) {
                        Ok(_) => acked += per_batch,
                        Err(ClientError::Api { status: 507, .. }) => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => break, // the daemon died: what was acknowledged stands
                    }
                }
                (run, acked, refused)
            })
        })
        .collect()
}

/// Points of `run` recorded with a step below `acked`: all must be there.
fn lost(c: &Client, run: &str, acked: u64) -> u64 {
    let series = c.metrics(run, &["m"]).unwrap();
    let present = series.get("m").map_or(0, |s| {
        s.iter().filter(|(step, _)| *step < acked).count() as u64
    });
    acked - present
}

fn crash(kills: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    let mut acknowledged: Vec<(String, u64)> = vec![];
    let mut restarts = vec![];
    for k in 0..kills {
        let t = Instant::now();
        let h = Herdd::start(dir.path());
        h.client().status().unwrap();
        restarts.push(t.elapsed().as_secs_f64());
        let stop = Arc::new(AtomicBool::new(false));
        let ws = writers(&h, 8, &format!("k{k}"), stop.clone(), 100);
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        h.kill9(); // SIGKILL: no destructors, no flush
        stop.store(true, Ordering::Relaxed);
        for w in ws {
            let (run, acked, _) = w.join().unwrap();
            acknowledged.push((run, acked));
        }
    }
    let h = Herdd::start(dir.path());
    let c = h.client();
    let total: u64 = acknowledged.iter().map(|(_, a)| a).sum();
    let lost: u64 = acknowledged.iter().map(|(r, a)| lost(&c, r, *a)).sum();
    let verified = c.verify().unwrap().ok;
    let mean = restarts.iter().sum::<f64>() / restarts.len() as f64;
    println!(
        "kill -9 under 8 writers: {kills} kills, {total} acknowledged points, {lost} lost; \
         restart to a served /status {mean:.2} s mean; verify {}",
        if verified { "ok" } else { "FAILED" }
    );
    assert!(lost == 0 && verified);
}

fn disk_full() {
    let keep = tempfile::tempdir().unwrap();
    let disk = keep.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&disk)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("disk full: SKIPPED (mounting a 64 MiB tmpfs needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let data = disk.join("data");
    let h = Herdd::start(&data);
    let stop = Arc::new(AtomicBool::new(false));
    let ws = writers(&h, 4, "full", stop.clone(), 200);
    // Fill the disk under them.
    let filler = disk.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        for size in [1 << 16, 4096, 64, 1] {
            let block = vec![7u8; size];
            while f.write_all(&block).is_ok() {}
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let c = h.client();
    let before = c.status().unwrap()["head_seq"].as_u64().unwrap();
    std::fs::remove_file(&filler).unwrap();
    // Space is back: the same daemon takes writes again.
    let mut resumed = false;
    for _ in 0..100 {
        if c.status().unwrap()["head_seq"].as_u64().unwrap() > before + 8 {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(String, u64, u64)> = ws.into_iter().map(|w| w.join().unwrap()).collect();
    drop(h);
    let h = Herdd::start(&data);
    let c = h.client();
    let total: u64 = results.iter().map(|r| r.1).sum();
    let refused: u64 = results.iter().map(|r| r.2).sum();
    let lost: u64 = results.iter().map(|(r, a, _)| lost(&c, r, *a)).sum();
    println!(
        "disk full (64 MiB tmpfs, 4 writers): {total} acknowledged points, {refused} batches refused with 507, \
         {lost} lost; writes resumed without a restart: {}",
        if resumed { "yes" } else { "NO" }
    );
    assert!(lost == 0 && refused > 0 && resumed);
}

/// Send raw bytes; the status code of the answer (0: closed without one).
fn raw(addr: &str, bytes: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn hostile() {
    let dir = tempfile::tempdir().unwrap();
    let h = Herdd::start(dir.path());
    let c = h.client();
    let addr = h.addr.trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {}\r\n", h.token);
    let mut rng = Lcg(11);
    let mut requests: Vec<Vec<u8>> = vec![];
    // Garbage request lines and headers.
    for _ in 0..40 {
        let n = 1 + rng.below(300) as usize;
        requests.push((0..n).map(|_| rng.below(256) as u8).collect());
    }
    let post = |path: &str, body: &[u8], extra: &str| {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    // Bad lengths.
    for cl in ["-1", "abc", "99999999999999999999", "10, 20", ""] {
        requests.push(
            format!(
                "POST /experiments HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {cl}\r\n\r\n{{}}"
            )
            .into_bytes(),
        );
    }
    requests.push(format!("POST /experiments HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 500\r\nConnection: close\r\n\r\n{{\"name\":").into_bytes());
    // Deep nesting, every depth past the limit.
    for depth in (33..300).step_by(12) {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        requests.push(post("/jobs", body.as_bytes(), ""));
        requests.push(post(
            "/experiments",
            format!("{{\"name\":{body}}}").as_bytes(),
            "",
        ));
    }
    // Wrong types and values in every field of a job request.
    let fields = [
        "kind",
        "inputs",
        "hyperparameters",
        "seed",
        "name",
        "experiment",
        "priority",
        "depends_on",
    ];
    let values = [
        json!(null),
        json!(-1),
        json!(1e308),
        json!("\u{0}"),
        json!([1, 2]),
        json!({"a": {"b": 1}}),
        json!("x".repeat(5000)),
        json!(true),
    ];
    for f in fields {
        for v in &values {
            let mut body = json!({"kind": "sft", "inputs": {"model": "0".repeat(64), "data": "1".repeat(64)}, "hyperparameters": {"steps": 1}});
            body[f] = v.clone();
            requests.push(post("/jobs", body.to_string().as_bytes(), ""));
        }
    }
    // Hyperparameters out of range, unknown, of the wrong type.
    for hp in [
        json!({"lr": 1e308}),
        json!({"lr": -1}),
        json!({"lr": "NaN"}),
        json!({"steps": 1e20}),
        json!({"beta": -5}),
        json!({"lrr": 1}),
        json!({"batch_size": 0}),
        json!([1]),
    ] {
        let body = json!({"kind": "dpo", "inputs": {}, "hyperparameters": hp});
        requests.push(post("/jobs", body.to_string().as_bytes(), ""));
    }
    // Names with escapes, controls, overrides; invalid UTF-8.
    for name in [
        "\u{1b}[2J",
        "a\u{0}b",
        "line\nbreak",
        "\u{202e}evil",
        " padded ",
        &"n".repeat(201),
        "",
    ] {
        requests.push(post(
            "/experiments",
            json!({"name": name}).to_string().as_bytes(),
            "",
        ));
    }
    requests.push(post("/experiments", b"{\"name\":\"\xff\xfe\"}", ""));
    // Paths and queries.
    for path in [
        "/blobs/../../etc/passwd",
        "/blobs/%2e%2e%2fetc",
        "/jobs/not-a-uuid",
        "/jobs?sort=bogus",
        "/jobs?limit=99999999999",
        "/jobs?where=hp.lr<<1",
        "/artifacts/ZZ",
        "/trees/..",
        "/runs/x/metrics",
        "/jobs?rows=101",
    ] {
        requests.push(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                .into_bytes(),
        );
    }
    // Without or with a bad token.
    for tok in [
        "",
        "Bearer ",
        "Bearer x",
        "Basic abc",
        &format!("Bearer {}x", h.token),
    ] {
        requests.push(format!("GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: {tok}\r\nConnection: close\r\n\r\n").into_bytes());
    }
    // Bodies over the limits.
    requests.push(format!("POST /experiments HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000000\r\nConnection: close\r\n\r\n").into_bytes());
    requests.push(post(
        "/runs",
        json!({"name": "r", "hyperparameters": [1, 2]})
            .to_string()
            .as_bytes(),
        "",
    ));
    let mut classes = std::collections::BTreeMap::<String, u32>::new();
    let mut server_errors = vec![];
    let mut accepted = vec![];
    for r in &requests {
        let code = raw(&addr, r);
        *classes
            .entry(match code {
                0 => "closed".into(),
                c => format!("{}xx", c / 100),
            })
            .or_default() += 1;
        if code >= 500 {
            server_errors.push(String::from_utf8_lossy(&r[..r.len().min(80)]).into_owned());
        }
        if (200..300).contains(&code) {
            accepted.push(String::from_utf8_lossy(&r[..r.len().min(200)]).into_owned());
        }
    }
    let status_ok = c.status().is_ok();
    let verified = c.verify().unwrap().ok;
    println!(
        "hostile requests: {} sent: {classes:?}; 5xx: {}; afterwards /status answers: {status_ok}, verify ok: {verified}",
        requests.len(),
        server_errors.len()
    );
    assert!(server_errors.is_empty(), "5xx for {server_errors:?}");
    assert!(
        accepted.is_empty(),
        "hostile requests accepted: {accepted:?}"
    );
    assert!(status_ok && verified);
}

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

fn stalled() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let h = Herdd::start(dir.path());
    let c = h.client();
    let addr = h.addr.trim_start_matches("http://").to_string();
    let head = format!(
        "POST /blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\nten bytes.",
        h.token
    );
    let mut held = vec![];
    for _ in 0..4200 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            break;
        };
        let _ = s.write_all(head.as_bytes());
        held.push(s);
    }
    let mut times = vec![];
    for _ in 0..20 {
        let t = Instant::now();
        c.status().expect("/status answers while bodies stall");
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    times.sort();
    println!(
        "stalled bodies: {} connections holding an upload open: /status median {:?}, worst {:?} of 20",
        held.len(),
        times[10],
        times[19]
    );
    assert!(
        times[19] < Duration::from_millis(100),
        "worst {:?}",
        times[19]
    );
}

fn load(secs: u64) {
    let dir = tempfile::tempdir().unwrap();
    let h = Herdd::start(dir.path());
    let run = h.client().open_run("load", None, &json!({})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for i in 0..100u64 {
            let (c, run, latencies, errors) =
                (h.client(), run.clone(), latencies.clone(), errors.clone());
            s.spawn(move || {
                let mut mine = vec![];
                let mut step = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r: Result<Value, _> = if i % 2 == 0 {
                        c.status()
                    } else {
                        step += 1;
                        c.log_metrics(&run, &[(i * 1_000_000 + step, "load", 1.0)])
                    };
                    if r.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    mine.push(t.elapsed());
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
    });
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let p99 = l[l.len() * 99 / 100];
    println!(
        "load: 100 clients for {secs} s (half /status, half durable metric points): {:.0} req/s, {} errors, p99 {:?}",
        l.len() as f64 / secs as f64,
        errors.load(Ordering::Relaxed),
        p99
    );
}

fn main() {
    // `cargo bench` passes --bench; a filter argument picks parts.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| part.contains(o.as_str()));
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if wants("crash") {
        crash(env("ATTACK_KILLS", 20) as usize);
    }
    if wants("disk_full") {
        disk_full();
    }
    if wants("hostile") {
        hostile();
    }
    if wants("stalled") {
        stalled();
    }
    if wants("load") {
        load(env("ATTACK_LOAD_SECS", 10));
    }
}
