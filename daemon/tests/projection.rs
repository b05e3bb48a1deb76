//! Views are pure folds: a projection kept live while events are appended
//! equals one rebuilt from the log afterwards, for any sequence of events;
//! and so do the views the daemon checkpoints to disk, evicts and reloads,
//! metric series included.

use std::collections::BTreeMap;

use herd_core::model::{streams, HerdEvent, MetricPoint};
use herd_core::{ArtifactKind, JobKind, Projection};
use herd_daemon::metrics::filed_attempt;
use herd_daemon::state::{load_views, new_event, rebuild, stored};
use herd_daemon::views::ViewStore;
use herd_store::{EventLog, ExpectedVersion, NewEvent};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    Experiment,
    Import(u8),
    Submit { exp: u8, input: u8 },
    Start(u8),
    Metrics(u8, u16),
    Output(u8, u8),
    Finish(u8, u8),
    Future,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Experiment),
        any::<u8>().prop_map(Op::Import),
        (any::<u8>(), any::<u8>()).prop_map(|(exp, input)| Op::Submit { exp, input }),
        any::<u8>().prop_map(Op::Start),
        // Up to 1,200 points: series cross the index's 512-point blocks.
        (any::<u8>(), 1u16..1200).prop_map(|(j, n)| Op::Metrics(j, n)),
        (any::<u8>(), any::<u8>()).prop_map(|(j, h)| Op::Output(j, h)),
        (any::<u8>(), 0u8..6).prop_map(|(j, how)| Op::Finish(j, how)),
        Just(Op::Future),
    ]
}

fn return_repair(job: Uuid) -> HerdEvent {
    HerdEvent::HistoryRepaired {
        first_lost: 3,
        last_lost: 5,
        acknowledged_lost: 2,
        reason: "test".into(),
        quarantine_file: None,
        interrupted_jobs: vec![job],
    }
}

fn hash(n: u8) -> String {
    format!("{:064x}", n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn replay_equals_live(ops in proptest::collection::vec(op(), 1..60), checkpoint_at in 0usize..60) {
        let dir = tempfile::tempdir().unwrap();
        let views_dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        let mut live = Projection::default();
        let (mut exps, mut jobs) = (vec![], vec![]);
            for (i, op) in ops.into_iter().enumerate() {
            if i == checkpoint_at {
                // A daemon that started here: views folded, saved, evicted.
                let views = std::sync::Arc::new(ViewStore::open(views_dir.path()).unwrap());
                load_views(&log, views).unwrap();
            }
            let (stream, event): (String, NewEvent) = match op {
                Op::Experiment => {
                    let id = Uuid::now_v7();
                    exps.push(id);
                    (streams::experiment(id), new_event(&HerdEvent::ExperimentCreated { experiment: id, name: format!("e{}", exps.len()), description: String::new() }))
                }
                Op::Import(h) => (streams::ARTIFACTS.into(), new_event(&HerdEvent::ArtifactImported { hash: hash(h), artifact: ArtifactKind::Sft, name: "d".into(), summary: json!({"rows": h}) })),
                Op::Submit { exp, input } => {
                    let id = Uuid::now_v7();
                    jobs.push(id);
                    let experiment = if exps.is_empty() { None } else { Some(exps[exp as usize % exps.len()]) };
                    let inputs = BTreeMap::from([("data".to_string(), hash(input))]);
                    (streams::job(id), new_event(&HerdEvent::JobSubmitted { job: id, experiment, round: None, name: "j".into(), kind: JobKind::Sft, inputs, hyperparameters: json!({"lr": 1e-5}), seed: 1, depends_on: vec![], priority: 0, reproduces: None, resources: Default::default() }))
                }
                Op::Start(j) if !jobs.is_empty() => {
                    let job = jobs[j as usize % jobs.len()];
                    (streams::job(job), new_event(&HerdEvent::JobStarted { job, attempt: 1, device: "cpu".into(), pid: None, executor: None, slurm_job: None, engine_version: "t".into(), fingerprint: Default::default(), threads: 2, resolved_inputs: BTreeMap::new(), effective_hyperparameters: json!({}) }))
                }
                Op::Metrics(j, n) if !jobs.is_empty() => {
                    let job = jobs[j as usize % jobs.len()];
                    let points = (0..n as u64).map(|s| MetricPoint { step: s, name: "loss".into(), value: 1.0 / (s as f64 + 1.0) }).collect();
                    (streams::job(job), new_event(&HerdEvent::JobMetrics { job, attempt: 1, points }))
                }
                Op::Output(j, h) if !jobs.is_empty() => {
                    let job = jobs[j as usize % jobs.len()];
                    (streams::job(job), new_event(&HerdEvent::JobOutput { job, name: "checkpoint".into(), hash: hash(h), artifact: ArtifactKind::Checkpoint, summary: json!(null) }))
                }
                Op::Finish(j, how) if !jobs.is_empty() => {
                    let job = jobs[j as usize % jobs.len()];
                    let e = match how {
                        0 => HerdEvent::JobSucceeded { job, summary: json!({"ok": true}) },
                        1 => HerdEvent::JobFailed { job, reason: "boom".into() },
                        2 => HerdEvent::JobCancelled { job, reason: "user".into() },
                        3 => HerdEvent::JobInterrupted { job, reason: "restart".into(), requeued: true },
                        4 => HerdEvent::JobInterrupted { job, reason: "repair lost its end".into(), requeued: false },
                        // A repair's record: not about one job, shown by status and verify.
                        _ => return_repair(job),
                    };
                    let stream = if matches!(e, HerdEvent::HistoryRepaired { .. }) { streams::HISTORY.to_string() } else { streams::job(job) };
                    (stream, new_event(&e))
                }
                // A type from a newer herd: must be readable and counted, not fatal.
                _ => ("future".into(), NewEvent::new("SomethingNew", json!({"x": [1, 2]}))),
            };
            log.append(&stream, ExpectedVersion::Any, vec![event]).unwrap();
            // Live: fold each event as soon as it is durable.
            for rec in log.read_all(live.last_seq + 1, usize::MAX).unwrap() {
                live.apply(&stored(&rec));
            }
        }
        let rebuilt = rebuild(&log).unwrap();
        prop_assert_eq!(&rebuilt, &live);
        prop_assert!(rebuilt.undecodable.is_empty());

        // The daemon's views: the checkpoint taken above plus what came after.
        let views = std::sync::Arc::new(ViewStore::open(views_dir.path()).unwrap());
        let saved = load_views(&log, views).unwrap();
        prop_assert_eq!(saved.last_seq, live.last_seq);
        prop_assert_eq!(&saved.experiments, &live.experiments);
        prop_assert_eq!(&saved.rounds, &live.rounds);
        prop_assert_eq!(&saved.artifacts, &live.artifacts);
        prop_assert_eq!(&saved.rows, &live.rows);
        prop_assert_eq!(saved.unknown_events, live.unknown_events);
        prop_assert_eq!(&saved.repairs, &live.repairs);
        for (id, view) in &live.jobs {
            let stored_view = saved.job(*id).unwrap().map(|v| v.into_owned());
            prop_assert_eq!(stored_view.as_ref(), Some(view));
            // Ended jobs' views left memory.
            prop_assert_eq!(saved.jobs.contains_key(id), !view.status.is_final());
        }
        // Metric series, filed per attempt as the fold counts them.
        let mut expected: BTreeMap<(Uuid, u32), BTreeMap<String, Vec<(u64, f64)>>> = BTreeMap::new();
        let mut attempts: BTreeMap<Uuid, u32> = BTreeMap::new();
        for rec in log.read_all(1, usize::MAX).unwrap() {
            match HerdEvent::from_recorded(&stored(&rec)) {
                Ok(HerdEvent::JobSubmitted { job, .. }) => { attempts.insert(job, 0); }
                Ok(HerdEvent::JobStarted { job, attempt, .. }) => { attempts.insert(job, attempt); }
                Ok(HerdEvent::JobMetrics { job, attempt, points }) => {
                    if let Some(a) = attempts.get(&job) {
                        let s = expected.entry((job, filed_attempt(attempt, *a))).or_default();
                        for p in points {
                            s.entry(p.name).or_default().push((p.step, p.value));
                        }
                    }
                }
                _ => {}
            }
        }
        for (job, a) in &attempts {
            for attempt in 0..=*a {
                let want = expected.remove(&(*job, attempt)).unwrap_or_default();
                prop_assert_eq!(saved.series(*job, attempt, None).unwrap(), want);
            }
        }
        drop(log);
        let reopened = EventLog::open(dir.path()).unwrap();
        prop_assert_eq!(rebuild(&reopened).unwrap(), live);
    }
}

#[test]
fn lineage_walks_back_to_imports() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let put = |s: &str, e: HerdEvent| {
        log.append(s, ExpectedVersion::Any, vec![new_event(&e)])
            .unwrap()
    };
    put(
        streams::ARTIFACTS,
        HerdEvent::ArtifactImported {
            hash: hash(1),
            artifact: ArtifactKind::Checkpoint,
            name: "base".into(),
            summary: json!(null),
        },
    );
    put(
        streams::ARTIFACTS,
        HerdEvent::ArtifactImported {
            hash: hash(2),
            artifact: ArtifactKind::Sft,
            name: "data".into(),
            summary: json!(null),
        },
    );
    let job = Uuid::now_v7();
    let inputs = BTreeMap::from([
        ("model".to_string(), hash(1)),
        ("data".to_string(), hash(2)),
    ]);
    put(
        &streams::job(job),
        HerdEvent::JobSubmitted {
            job,
            experiment: None,
            round: None,
            name: "sft".into(),
            kind: JobKind::Sft,
            inputs,
            hyperparameters: json!({}),
            seed: 0,
            depends_on: vec![],
            priority: 0,
            reproduces: None,
            resources: Default::default(),
        },
    );
    put(
        &streams::job(job),
        HerdEvent::JobOutput {
            job,
            name: "checkpoint".into(),
            hash: hash(3),
            artifact: ArtifactKind::Checkpoint,
            summary: json!(null),
        },
    );
    let p = rebuild(&log).unwrap();
    let tree = p.lineage(&hash(3), &|id| p.jobs.get(&id).cloned()).unwrap();
    let j = tree.job.unwrap();
    assert_eq!(j.kind, JobKind::Sft);
    assert_eq!(j.inputs["model"].name, "base");
    assert_eq!(j.inputs["data"].artifact, Some(ArtifactKind::Sft));
    assert!(j.inputs["model"].job.is_none());
}

fn small_log(dir: &std::path::Path, jobs: usize) -> EventLog {
    let log = EventLog::open(dir).unwrap();
    for i in 0..jobs {
        let job = Uuid::now_v7();
        let events = [
            HerdEvent::JobSubmitted {
                job,
                experiment: None,
                round: None,
                name: format!("j{i}"),
                kind: JobKind::Sft,
                inputs: BTreeMap::new(),
                hyperparameters: json!({"lr": i}),
                seed: 1,
                depends_on: vec![],
                priority: 0,
                reproduces: None,
                resources: Default::default(),
            },
            HerdEvent::JobMetrics {
                job,
                attempt: 0,
                points: vec![MetricPoint {
                    step: 1,
                    name: "loss".into(),
                    value: i as f64,
                }],
            },
            HerdEvent::JobSucceeded {
                job,
                summary: json!(null),
            },
        ];
        log.append(
            &streams::job(job),
            ExpectedVersion::Any,
            events.iter().map(new_event).collect(),
        )
        .unwrap();
    }
    log
}

/// Views checkpointed for one log are never served for another (a restored
/// or repaired data directory): the event at the checkpoint is checked.
#[test]
fn views_of_another_log_are_rebuilt() {
    let views_dir = tempfile::tempdir().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let views = herd_daemon::state::open_views(views_dir.path()).unwrap();
    let log_a = small_log(a.path(), 5);
    assert_eq!(load_views(&log_a, views.clone()).unwrap().rows.len(), 5);
    // Same length, other events: the checkpoint's event id differs.
    let log_b = small_log(b.path(), 5);
    let live = load_views(&log_b, views).unwrap();
    assert_eq!(live.rows, rebuild(&log_b).unwrap().rows);
}

/// A damaged view store is derived data: set aside, rebuilt from the log.
#[test]
fn a_damaged_view_store_is_rebuilt() {
    let data = tempfile::tempdir().unwrap();
    let log = small_log(&data.path().join("log"), 3);
    let dir = data.path().join("views");
    {
        let views = herd_daemon::state::open_views(&dir).unwrap();
        load_views(&log, views).unwrap();
    }
    // Garbage over every file of sled's database.
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, b"\xff garbage \x00\x01").unwrap();
        }
    }
    let views = herd_daemon::state::open_views(&dir).unwrap();
    let live = load_views(&log, views).unwrap();
    let pure = rebuild(&log).unwrap();
    assert_eq!(live.rows, pure.rows);
    let id = *pure.jobs.keys().next().unwrap();
    assert_eq!(live.series(id, 0, None).unwrap()["loss"].len(), 1);
    let aside = std::fs::read_dir(data.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("views.damaged-")
        })
        .count();
    assert_eq!(aside, 1, "the damaged store is kept aside, not deleted");
}
