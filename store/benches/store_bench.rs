//! Event store throughput: durable single appends from 1 and 32 writers,
//! batched appends (1,000 per batch), full replay of 1M events, reading one
//! stream of 20k events. Every append here is flushed and fdatasynced before
//! it returns.
//!
//! Run: `cargo bench -p herd-store --bench store_bench`

use std::time::Instant;

use herd_store::{EventLog, ExpectedVersion, NewEvent};
use serde_json::json;

fn metric(i: u64) -> NewEvent {
    NewEvent::new(
        "JobMetrics",
        json!({"job": "bench", "points": [{"step": i, "name": "loss", "value": 1.0 / (i as f64 + 1.0)}]}),
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path()).unwrap();

    // 1 writer, single durable appends.
    let n = 2_000;
    let t = Instant::now();
    for i in 0..n {
        log.append("single", ExpectedVersion::Any, vec![metric(i)])
            .unwrap();
    }
    println!(
        "durable single appends, 1 writer: {:.0} events/s",
        n as f64 / t.elapsed().as_secs_f64()
    );

    // 32 writers: group commit shares each flush.
    let per = 500;
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..32 {
            let log = log.clone();
            s.spawn(move || {
                for i in 0..per {
                    log.append(&format!("w{w}"), ExpectedVersion::Any, vec![metric(i)])
                        .unwrap();
                }
            });
        }
    });
    println!(
        "durable single appends, 32 writers: {:.0} events/s",
        (32 * per) as f64 / t.elapsed().as_secs_f64()
    );

    // Batches of 1,000. Events carry their payload as JSON text, serialized
    // when the event is made (in the daemon: when the request is decoded), so
    // the events are built before the clock starts; the line after shows the
    // cost of building them from `json!` trees as well.
    let batches = 200;
    let prepared: Vec<Vec<NewEvent>> = (0..batches)
        .map(|b| (0..1000).map(|i| metric(b * 1000 + i)).collect())
        .collect();
    let t = Instant::now();
    for events in prepared {
        log.append("batched", ExpectedVersion::Any, events).unwrap();
    }
    println!(
        "durable batched appends (1,000/batch): {:.0} events/s",
        (batches * 1000) as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for b in 0..batches {
        let events = (0..1000).map(|i| metric(b * 1000 + i)).collect();
        log.append("batched", ExpectedVersion::Any, events).unwrap();
    }
    println!(
        "  the same, building each event from a json! tree inside the timing: {:.0} events/s",
        (batches * 1000) as f64 / t.elapsed().as_secs_f64()
    );

    // Fill to 1M events, then replay everything.
    let have = log.head_seq();
    let mut b = 0;
    while log.head_seq() < 1_000_000 {
        let k = (1_000_000 - log.head_seq()).min(10_000);
        let events = (0..k).map(|i| metric(b * 10_000 + i)).collect();
        log.append(
            if b % 50 == 0 { "stream20k" } else { "fill" },
            ExpectedVersion::Any,
            events,
        )
        .unwrap();
        b += 1;
    }
    let _ = have;
    let t = Instant::now();
    let mut seen = 0u64;
    let mut from = 1;
    loop {
        let chunk = log.read_all(from, 65_536).unwrap();
        if chunk.is_empty() {
            break;
        }
        seen += chunk.len() as u64;
        from = chunk.last().unwrap().seq + 1;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "full replay: {seen} events in {secs:.2} s = {:.0} events/s",
        seen as f64 / secs
    );

    // One stream of 20k events.
    let len = log.stream_version("stream20k").unwrap().min(20_000) as usize;
    let t = Instant::now();
    let evs = log.read_stream("stream20k", 1, 20_000).unwrap();
    println!(
        "read one stream of {} events: {:.1} ms",
        evs.len().min(len),
        t.elapsed().as_secs_f64() * 1000.0
    );

    // Reopen: every open re-hashes the indexed chain against the index's
    // head hash (the price of never starting on a changed record).
    let head = log.head_seq();
    let path = log.path().to_path_buf();
    drop(log);
    let t = Instant::now();
    let log = EventLog::open(&path).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(log.head_seq(), head);
    println!(
        "open with chain check: {head} events in {secs:.2} s = {:.0} events/s",
        head as f64 / secs
    );
}
