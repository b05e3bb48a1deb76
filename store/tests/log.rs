//! Event log: conflicts, idempotency, concurrency, subscriptions, corruption.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use herd_store::{EventLog, ExpectedVersion, NewEvent, StoreError};
use serde_json::json;

fn ev(n: u64) -> NewEvent {
    NewEvent::new("Tick", json!({ "n": n }))
}

#[test]
fn expected_versions_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let r = log
        .append("a", ExpectedVersion::NoStream, vec![ev(1), ev(2)])
        .unwrap();
    assert_eq!((r.first_seq, r.last_seq, r.version), (1, 2, 2));
    let err = log
        .append("a", ExpectedVersion::NoStream, vec![ev(3)])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { current: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("at version 2"), "{err}");
    let err = log
        .append("a", ExpectedVersion::Exact(1), vec![ev(3)])
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { current: 2, .. }));
    log.append("a", ExpectedVersion::Exact(2), vec![ev(3)])
        .unwrap();
    let err = log
        .append("b", ExpectedVersion::StreamExists, vec![ev(4)])
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { current: 0, .. }));
    log.append("b", ExpectedVersion::Any, vec![ev(4)]).unwrap();
    let a = log.read_stream("a", 1, usize::MAX).unwrap();
    assert_eq!(
        a.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(log.read_all(1, usize::MAX).unwrap().len(), 4);
    log.verify_chain().unwrap();
}

#[test]
fn bad_appends_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    assert!(matches!(
        log.append("", ExpectedVersion::Any, vec![ev(1)]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        log.append("a\0b", ExpectedVersion::Any, vec![ev(1)]),
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        log.append("a", ExpectedVersion::Any, vec![]),
        Err(StoreError::Invalid(_))
    ));
    let e = ev(1);
    let err = log
        .append("a", ExpectedVersion::Any, vec![e.clone(), e])
        .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert_eq!(log.head_seq(), 0);
}

#[test]
fn retrying_an_append_stores_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let batch = vec![ev(1), ev(2)];
    let first = log
        .append("s", ExpectedVersion::NoStream, batch.clone())
        .unwrap();
    // The retry carries the stale expected version; it is still a success.
    let again = log
        .append("s", ExpectedVersion::NoStream, batch.clone())
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.first_seq, again.last_seq),
        (first.first_seq, first.last_seq)
    );
    assert_eq!(log.head_seq(), 2);
    let mixed = vec![batch[0].clone(), ev(3)];
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, mixed),
        Err(StoreError::PartialDuplicate { .. })
    ));
    assert_eq!(log.head_seq(), 2);
    drop(log);
    // Idempotency survives a restart.
    let log = EventLog::open(dir.path()).unwrap();
    assert!(
        log.append("s", ExpectedVersion::Any, batch)
            .unwrap()
            .duplicate
    );
    assert_eq!(log.head_seq(), 2);
}

/// 8 writers, each doing optimistic read-modify-append on a shared stream and
/// plain appends on its own: every conflict is detected and retried, nothing
/// is lost or duplicated, versions and sequences are gap-free.
#[test]
fn concurrent_writers_with_expected_versions() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    const WRITERS: u64 = 8;
    const PER: u64 = 40;
    let barrier = Arc::new(Barrier::new(WRITERS as usize));
    let conflicts: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let log = log.clone();
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    let mut conflicts = 0;
                    for i in 0..PER {
                        loop {
                            let v = log.stream_version("shared").unwrap();
                            match log.append(
                                "shared",
                                ExpectedVersion::Exact(v),
                                vec![ev(w * 1000 + i)],
                            ) {
                                Ok(r) => {
                                    assert_eq!(r.version, v + 1);
                                    break;
                                }
                                Err(StoreError::Conflict { .. }) => conflicts += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                        log.append(&format!("own-{w}"), ExpectedVersion::Exact(i), vec![ev(i)])
                            .unwrap();
                    }
                    conflicts
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let shared = log.read_stream("shared", 1, usize::MAX).unwrap();
    assert_eq!(shared.len() as u64, WRITERS * PER);
    assert!(shared
        .iter()
        .enumerate()
        .all(|(i, e)| e.version == i as u64 + 1));
    let ns: HashSet<u64> = shared
        .iter()
        .map(|e| e.payload_value().unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns.len() as u64,
        WRITERS * PER,
        "no duplicates in the shared stream"
    );
    for w in 0..WRITERS {
        let own = log.read_stream(&format!("own-{w}"), 1, usize::MAX).unwrap();
        assert_eq!(own.len() as u64, PER);
    }
    let all = log.read_all(1, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, 2 * WRITERS * PER);
    assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    log.verify_chain().unwrap();
    eprintln!("conflicts detected and retried: {conflicts}");
}

#[test]
fn subscription_sees_every_event_once_while_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    for i in 0..500 {
        log.append("pre", ExpectedVersion::Any, vec![ev(i)])
            .unwrap();
    }
    let mut sub = log.subscribe(100);
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..1000 {
                log.append(
                    &format!("live-{}", i % 3),
                    ExpectedVersion::Any,
                    vec![ev(i)],
                )
                .unwrap();
            }
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 1401 {
        let e = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), sub.next()).await })
            .expect("subscription stalled")
            .unwrap();
        seen.push(e.seq);
    }
    writer.join().unwrap();
    assert_eq!(seen, (100..=1500).collect::<Vec<_>>());
    let more =
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), sub.next()).await });
    assert!(more.is_err(), "nothing beyond the head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_subscription_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let mut sub = log.subscribe(1);
    let l2 = log.clone();
    let writer = tokio::spawn(async move {
        for i in 0..200 {
            l2.append_async("x", ExpectedVersion::Any, vec![ev(i)])
                .await
                .unwrap();
        }
    });
    for want in 1..=200 {
        assert_eq!(sub.next().await.unwrap().seq, want);
    }
    writer.await.unwrap();
}

#[test]
fn a_changed_record_breaks_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    for i in 0..10 {
        log.append("s", ExpectedVersion::Any, vec![ev(i)]).unwrap();
    }
    // Change the payload of record 5 without changing its length.
    let rec = log.get(5).unwrap().unwrap();
    assert_eq!(rec.payload.get(), r#"{"n":4}"#);
    log.corrupt_record_for_test(5, |bytes| {
        let at = bytes.windows(5).position(|w| w == br#""n":4"#).unwrap();
        bytes[at + 4] = b'9';
    })
    .unwrap();
    assert_eq!(log.get(5).unwrap().unwrap().payload.get(), r#"{"n":9}"#);
    // Record 5 still parses, but record 6 no longer names its hash: nothing
    // vouches for record 5, and that is the record named.
    let err = log.verify_chain().unwrap_err();
    assert!(
        matches!(err, StoreError::BrokenChain { seq: 5, .. }),
        "{err}"
    );
    // Garbage bytes are reported as corrupt, with the sequence, not a panic.
    log.corrupt_record_for_test(3, |bytes| bytes.fill(0xff))
        .unwrap();
    let err = log.get(3).unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptEvent { seq: 3, .. }),
        "{err}"
    );
    assert!(matches!(
        log.verify_chain().unwrap_err(),
        StoreError::CorruptEvent { seq: 3, .. }
    ));
}

#[test]
fn versions_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(dir.path()).unwrap();
        log.append("s", ExpectedVersion::Any, vec![ev(1), ev(2)])
            .unwrap();
    }
    let log = EventLog::open(dir.path()).unwrap();
    assert_eq!(log.head_seq(), 2);
    let r = log
        .append("s", ExpectedVersion::Exact(2), vec![ev(3)])
        .unwrap();
    assert_eq!((r.first_seq, r.version), (3, 3));
    let by_stream: BTreeMap<_, _> = log
        .read_all(1, 10)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.version))
        .collect();
    assert_eq!(by_stream.len(), 3);
    log.verify_chain().unwrap();
}

#[test]
fn oversized_events_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let big = NewEvent::new("Big", json!({"blob": "x".repeat(200 * 1024)}));
    let err = log
        .append("s", ExpectedVersion::Any, vec![ev(1), big])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(_)) && err.to_string().contains("limit"),
        "{err}"
    );
    assert_eq!(log.head_seq(), 0);
}

#[test]
fn an_uncommitted_tail_is_cut_and_a_truncated_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    {
        let log = EventLog::open(dir.path()).unwrap();
        log.append("s", ExpectedVersion::Any, vec![ev(1), ev(2)])
            .unwrap();
    }
    // A crash after writing a group's records but before its index commit.
    let committed = std::fs::metadata(&file).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":3,\"torn").unwrap();
    drop(f);
    {
        let log = EventLog::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), committed);
        let r = log
            .append("s", ExpectedVersion::Exact(2), vec![ev(3)])
            .unwrap();
        assert_eq!(r.first_seq, 3);
        assert_eq!(log.verify_chain().unwrap().events, 3);
    }
    // Losing committed bytes is corruption, reported at open.
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = EventLog::open(dir.path())
        .err()
        .expect("a truncated log must not open");
    assert!(
        matches!(err, StoreError::Damaged { seq: 3, .. })
            && err.to_string().contains("acknowledged event 3 is missing"),
        "{err}"
    );
}

/// Ids are indexed in buckets by their first six bytes (the millisecond of a
/// UUID v7): ids sharing a bucket across several index values and appends,
/// and arbitrary (v4) ids, are all found again, also after a restart.
#[test]
fn every_stored_id_is_found_however_ids_are_bucketed() {
    let dir = tempfile::tempdir().unwrap();
    let same_ms = |n: u64, base: u128| -> Vec<NewEvent> {
        (0..n)
            .map(|i| {
                let mut e = ev(i);
                // One millisecond prefix, distinct tails.
                e.id = uuid::Uuid::from_u128(base | (i as u128 * 7919));
                e
            })
            .collect()
    };
    let base = 0x0190_0000_0001u128 << 80;
    let big = same_ms(700, base);
    let other = same_ms(300, base | (1 << 40));
    let random: Vec<NewEvent> = (0..50)
        .map(|i| {
            let mut e = ev(i);
            // Arbitrary ids (not time-ordered), as a v4 generator would give.
            e.id = uuid::Uuid::from_u128(rand::random::<u128>());
            e
        })
        .collect();
    {
        let log = EventLog::open(dir.path()).unwrap();
        log.append("a", ExpectedVersion::Any, big.clone()).unwrap();
        log.append("b", ExpectedVersion::Any, other.clone())
            .unwrap();
        log.append("c", ExpectedVersion::Any, random.clone())
            .unwrap();
    }
    let log = EventLog::open(dir.path()).unwrap();
    for (batch, first, last) in [(&big, 1, 700), (&other, 701, 1000), (&random, 1001, 1050)] {
        let r = log
            .append("z", ExpectedVersion::Any, batch.clone())
            .unwrap();
        assert!(r.duplicate);
        assert_eq!((r.first_seq, r.last_seq), (first, last));
    }
    // One stored id from the middle of a bucket, one new: refused.
    let mixed = vec![big[450].clone(), ev(1)];
    assert!(matches!(
        log.append("z", ExpectedVersion::Any, mixed),
        Err(StoreError::PartialDuplicate {
            stored: 1,
            total: 2,
            ..
        })
    ));
    assert_eq!(log.head_seq(), 1050);
}

#[test]
fn verify_notices_a_lost_id_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();
    let events: Vec<NewEvent> = (0..5).map(ev).collect();
    let third = events[2].id;
    log.append("s", ExpectedVersion::Any, events).unwrap();
    assert_eq!(log.verify_chain().unwrap().events, 5);
    log.drop_id_bucket_for_test(&third).unwrap();
    let err = log.verify_chain().unwrap_err();
    assert!(
        matches!(err, StoreError::BrokenChain { .. }) && err.to_string().contains("id index"),
        "{err}"
    );
}
