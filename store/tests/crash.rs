//! Crash safety: a child process appends as fast as it can and prints each
//! acknowledged sequence; the parent SIGKILLs it at random moments, reopens
//! the log, and checks that every acknowledged event is present, intact and
//! chained. Runs 20+ kill cycles on the same directory.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herd_store::{EventLog, ExpectedVersion, NewEvent};
use rand::Rng;
use serde_json::json;

const CHILD_ENV: &str = "HERD_STORE_CRASH_CHILD_DIR";

/// In child mode (env set) this is the appender; otherwise it does nothing.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let log = EventLog::open(std::path::Path::new(&dir)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let stream = format!("w{t}");
                for i in 0.. {
                    let n = 1 + (i % 3);
                    let events = (0..n)
                        .map(|k| NewEvent::new("Tick", json!({"t": t, "i": i, "k": k})))
                        .collect();
                    let r = log.append(&stream, ExpectedVersion::Any, events).unwrap();
                    println!("ack {} {}", r.first_seq, r.last_seq);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn acknowledged_events_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut acked_max = 0u64;
    for round in 0..22 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.find("ack ").map(|i| &line[i + 4..]) {
                    let last: u64 = rest.split(' ').nth(1).unwrap().parse().unwrap();
                    let _ = tx.send(last);
                }
            }
        });
        // Wait for the first acknowledgement, then a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child never acknowledged");
        acked_max = acked_max.max(first);
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(5..120));
        while Instant::now() < deadline {
            std::thread::yield_now();
        }
        // SIGKILL: no destructors, no flush.
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(s) = rx.try_recv() {
            acked_max = acked_max.max(s);
        }
        let log = EventLog::open(dir.path()).unwrap();
        let report = log
            .verify_chain()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            report.events >= acked_max,
            "round {round}: acknowledged up to {acked_max}, found {}",
            report.events
        );
        for seq in [1, acked_max / 2 + 1, acked_max] {
            assert!(
                log.get(seq).unwrap().is_some(),
                "round {round}: event {seq} missing"
            );
        }
        // The next incarnation continues the chain.
        log.append(
            "parent",
            ExpectedVersion::Any,
            vec![NewEvent::new("Reopened", json!({"round": round}))],
        )
        .unwrap();
        acked_max = log.head_seq();
    }
    assert!(acked_max > 22);
}
