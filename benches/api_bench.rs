//! The HTTP API under load: durable metric events per second (single events
//! from 32 keep-alive clients, and batches of 10,000), and the latency of
//! reading back a 20k-point metric series.
//!
//! Run: `cargo bench --bench api_bench`

use std::time::Instant;

use herd_client::Client;
use herd_daemon::scheduler::SchedulerConfig;
use herd_daemon::server::{Daemon, DaemonConfig};
use serde_json::json;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = DaemonConfig {
        dashboard_hosts: vec![],
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        scheduler: SchedulerConfig::local(vec!["true".into()], vec!["cpu".into()], 1),
        dashboard: None,
    };
    let daemon = rt.block_on(Daemon::start(config)).unwrap();
    let server = format!("http://{}", daemon.addr);
    let c = Client::new(&server, &daemon.token);
    let run = c.open_run("bench", None, &json!({})).unwrap();

    // Single events, 32 clients with keep-alive.
    let (clients, per) = (32, 200);
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..clients {
            let (server, token, run) = (server.clone(), daemon.token.clone(), run.clone());
            s.spawn(move || {
                let c = Client::new(&server, &token);
                let name = format!("single{i}");
                for k in 0..per {
                    c.log_metrics(&run, &[(k as u64, name.as_str(), k as f64)])
                        .unwrap();
                }
            });
        }
    });
    println!(
        "single durable metric events over HTTP (32 keep-alive clients): {:.0} events/s",
        (clients * per) as f64 / t.elapsed().as_secs_f64()
    );

    // Batches of 10,000 points (one event each), from 4 clients.
    let (bclients, batches, size) = (4, 10, 10_000);
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..bclients {
            let (server, token, run) = (server.clone(), daemon.token.clone(), run.clone());
            s.spawn(move || {
                let c = Client::new(&server, &token);
                let name = format!("batch{i}");
                for b in 0..batches {
                    let pts: Vec<(u64, &str, f64)> = (0..size)
                        .map(|k| ((b * size + k) as u64, name.as_str(), k as f64))
                        .collect();
                    c.log_metrics(&run, &pts).unwrap();
                }
            });
        }
    });
    println!(
        "batched durable metric points over HTTP (10,000/request, 4 clients): {:.0} points/s",
        (bclients * batches * size) as f64 / t.elapsed().as_secs_f64()
    );

    // A 20k-point series: "batch0" has 100k points; ask for a 20k-point one.
    let pts: Vec<(u64, &str, f64)> = (0..20_000)
        .map(|k| (k as u64, "loss20k", 1.0 / (k as f64 + 1.0)))
        .collect();
    c.log_metrics(&run, &pts).unwrap();
    let mut times = vec![];
    for _ in 0..20 {
        let t = Instant::now();
        let s = c.metrics(&run, &["loss20k"]).unwrap();
        assert_eq!(s["loss20k"].len(), 20_000);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "history query of a 20k-point series: median {:.1} ms, max {:.1} ms",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    rt.block_on(daemon.shutdown()).unwrap();
}
