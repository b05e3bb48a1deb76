//! The executor seam's cost: a tiny job's overhead from submit to its first
//! metric and to its end, and the wall time of 50 tiny jobs submitted at
//! once, on the local executor and on Slurm (a one-node cluster started
//! here, as the tests do, with the machine's real CPU count so both run
//! the same number of jobs side by side).
//!
//! Run: `cargo bench --bench executor_bench` (Slurm part: root and Debian's
//! slurmctld, slurmd, slurm-client, munge; skipped with the reason
//! otherwise).

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{slurm, Daemon};
use herd_client::{Client, JobStatus};
use serde_json::json;

const SINGLE_RUNS: usize = 10;
const MANY: usize = 50;

/// (model, data) hashes of the fixture model and SFT rows.
fn import(c: &Client) -> (String, String) {
    let (model, _, _, _, data) = common::import_fixtures(c);
    (model, data)
}

/// One SFT step: the tiniest job that trains and reports a metric.
fn submit_tiny(c: &Client, model: &str, data: &str) -> String {
    let body = json!({"kind": "sft", "inputs": {"model": model, "data": data},
                      "hyperparameters": {"steps": 1, "batch_size": 2}});
    c.post("/jobs", &body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

struct Figures {
    first_metric_ms: f64,
    done_ms: f64,
    many_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(c: &Client) -> Figures {
    let (model, data) = import(c);
    // Warm the tree cache and the page cache once.
    let warm = submit_tiny(c, &model, &data);
    assert_eq!(
        c.wait(&warm, Duration::from_secs(300)).unwrap().status,
        JobStatus::Succeeded
    );
    let (mut first, mut done) = (vec![], vec![]);
    for _ in 0..SINGLE_RUNS {
        let t = Instant::now();
        let id = submit_tiny(c, &model, &data);
        loop {
            let j = c.job(&id).unwrap();
            if j.metric_points > 0 && first.len() < done.len() + 1 {
                first.push(t.elapsed().as_secs_f64() * 1e3);
            }
            if j.status.is_final() {
                assert_eq!(j.status, JobStatus::Succeeded, "{:?}", j.error);
                done.push(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let t = Instant::now();
    let ids: Vec<String> = (0..MANY).map(|_| submit_tiny(c, &model, &data)).collect();
    for id in &ids {
        let j = c.wait(id, Duration::from_secs(1800)).unwrap();
        assert_eq!(j.status, JobStatus::Succeeded, "{:?}", j.error);
    }
    Figures {
        first_metric_ms: median(first),
        done_ms: median(done),
        many_s: t.elapsed().as_secs_f64(),
    }
}

/// Slurm alone: `sbatch --wrap true` until `scontrol` says COMPLETED, the
/// floor under any executor built on it (median of `SINGLE_RUNS`).
fn slurm_round_trip_ms(cluster: &slurm::Cluster) -> f64 {
    let mut times = vec![];
    for _ in 0..SINGLE_RUNS {
        let t = Instant::now();
        let out = cluster
            .command("sbatch")
            .args([
                "--parsable",
                "--cpus-per-task=1",
                "--mem=256M",
                "--output=/dev/null",
                "--wrap",
                "true",
            ])
            .output()
            .unwrap();
        let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        while cluster.job_field(id, "JobState").as_deref() != Some("COMPLETED") {
            std::thread::sleep(Duration::from_millis(5));
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

fn main() {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    println!("executor_bench: {SINGLE_RUNS} tiny jobs one at a time (median), then {MANY} at once; {cores} cores, 1 thread per job");
    let dir = tempfile::tempdir().unwrap();
    let local = Daemon::start_with(
        dir.path(),
        &["--cpu-jobs", &cores.to_string(), "--threads", "1"],
    );
    let l = measure(&local.client());
    drop(local);
    println!("| executor | submit → first metric | submit → succeeded | {MANY} tiny jobs |");
    println!("|---|---|---|---|");
    println!(
        "| local ({cores} slots) | {:.0} ms | {:.0} ms | {:.1} s |",
        l.first_metric_ms, l.done_ms, l.many_s
    );
    match slurm::Cluster::start_with_cpus(cores) {
        Err(why) => println!("| slurm | skipped: {why} | | |"),
        Ok(cluster) => {
            let dir = tempfile::tempdir().unwrap();
            let herdd = Daemon::start_env(
                dir.path(),
                &[
                    "--executor",
                    "slurm",
                    "--slurm-resources",
                    "cpus=1,mem=1G",
                    "--slurm-max-jobs",
                    &MANY.to_string(),
                ],
                &[("SLURM_CONF", &cluster.conf)],
            );
            let s = measure(&herdd.client());
            drop(herdd);
            println!(
                "| slurm (1 node, {cores} CPUs) | {:.0} ms | {:.0} ms | {:.1} s |",
                s.first_metric_ms, s.done_ms, s.many_s
            );
            println!(
                "| Slurm alone: `sbatch --wrap true` to COMPLETED | | {:.0} ms | |",
                slurm_round_trip_ms(&cluster)
            );
        }
    }
}
