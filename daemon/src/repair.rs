//! `herdd repair`: the store's repair, and what the record must then say.
//!
//! The store finds damage against what its index says was acknowledged and,
//! only with `--accept-loss`, sets it aside (herd_store::recovery). A loss
//! the record does not mention would launder history, so this adds the two
//! facts only herd's vocabulary can state:
//!
//! * a `HistoryRepaired` event naming the lost sequences and why, which
//!   `verify`, `history`, `/status` and the dashboard show;
//! * every job whose later events may be among the lost marked interrupted
//!   (`JobInterrupted { requeued: false }`): ended, visible, resubmittable,
//!   never re-run by the scheduler on its own.
//!
//! The store leaves a pending report beside the quarantined records before
//! it cuts anything; recording it renames the report, and herdd records any
//! report still pending when it starts. A crash between the two can delay
//! the event, never drop it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd_core::model::streams;
use herd_core::HerdEvent;
use herd_store::recovery::PENDING_SUFFIX;
use herd_store::{EventLog, ExpectedVersion, RepairReport};
use uuid::Uuid;

/// What `herdd repair` did: the store's report, and what was recorded.
pub struct Repaired {
    pub report: RepairReport,
    /// The `HistoryRepaired` events appended (one per pending report).
    pub recorded: Vec<Recorded>,
}

/// One loss, as recorded.
pub struct Recorded {
    pub seq: u64,
    pub interrupted_jobs: Vec<Uuid>,
}

/// Repair the log in `data_dir` (herdd stopped, the directory locked by
/// the caller) and record any loss.
pub fn repair(data_dir: &Path, accept_loss: bool) -> Result<Repaired> {
    let log_dir = data_dir.join("log");
    let report = herd_store::repair(&log_dir, accept_loss)?;
    let recorded = if report.applied {
        record_pending(data_dir)?
    } else {
        vec![]
    };
    Ok(Repaired { report, recorded })
}

fn pending_reports(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = data_dir.join("log").join("quarantine");
    let mut found: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(PENDING_SUFFIX))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    found.sort(); // by their millisecond stamps: in the order they happened
    Ok(found)
}

/// Whether a repair's loss still waits to be recorded.
pub fn has_pending(data_dir: &Path) -> Result<bool> {
    Ok(!pending_reports(data_dir)?.is_empty())
}

/// Record every pending repair report as events, then mark it recorded.
pub fn record_pending(data_dir: &Path) -> Result<Vec<Recorded>> {
    let pending = pending_reports(data_dir)?;
    if pending.is_empty() {
        return Ok(vec![]);
    }
    let log = EventLog::open(&data_dir.join("log"))?;
    let mut recorded = vec![];
    for path in pending {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let report: RepairReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a repair report", path.display()))?;
        recorded.push(record(&log, data_dir, &report)?);
        let done = path.with_file_name(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .replace(PENDING_SUFFIX, ".recorded.json"),
        );
        std::fs::rename(&path, &done).with_context(|| format!("renaming {}", path.display()))?;
    }
    Ok(recorded)
}

fn record(log: &EventLog, data_dir: &Path, report: &RepairReport) -> Result<Recorded> {
    let (first_lost, last_lost) = report
        .lost
        .context("a pending repair report names what was lost")?;
    let reason = report.reason.clone().unwrap_or_default();
    // Which jobs the lost events were about, when every one of them can be
    // read; otherwise any job not ended may have lost its ending.
    let lost_jobs = report
        .quarantine_file
        .as_deref()
        .map(|f| jobs_named_in(&data_dir.join(f), last_lost - first_lost + 1))
        .transpose()?
        .flatten();
    let interrupted_jobs: Vec<Uuid> = unended_jobs(log)?
        .into_iter()
        .filter(|j| lost_jobs.as_ref().is_none_or(|lost| lost.contains(j)))
        .collect();
    let repaired = HerdEvent::HistoryRepaired {
        first_lost,
        last_lost,
        acknowledged_lost: report.acknowledged_lost,
        reason,
        quarantine_file: report.quarantine_file.clone(),
        interrupted_jobs: interrupted_jobs.clone(),
    };
    let seq = append(log, streams::HISTORY, repaired)?;
    for &job in &interrupted_jobs {
        append(
            log,
            &streams::job(job),
            HerdEvent::JobInterrupted {
                job,
                reason: format!(
                    "herdd repair lost events {first_lost}–{last_lost} (event {seq} says why), which may have \
                     held this job's later events; it will not run again on its own: resubmit it \
                     (`herd reproduce {job}`)"
                ),
                requeued: false,
            },
        )?;
    }
    Ok(Recorded {
        seq,
        interrupted_jobs,
    })
}

fn append(log: &EventLog, stream: &str, event: HerdEvent) -> Result<u64> {
    let new = crate::state::new_event(&event);
    Ok(log
        .append(stream, ExpectedVersion::Any, vec![new])?
        .first_seq)
}

/// The jobs the set-aside records are about, or None when fewer than
/// `lost` of them can be read (a torn or garbage line, records that are
/// missing altogether): then nobody can say which jobs lost events.
fn jobs_named_in(quarantined: &Path, lost: u64) -> Result<Option<BTreeSet<Uuid>>> {
    let text =
        std::fs::read(quarantined).with_context(|| format!("reading {}", quarantined.display()))?;
    let mut jobs = BTreeSet::new();
    let mut read = 0u64;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            continue; // a torn line names nothing for sure
        };
        #[derive(serde::Deserialize)]
        struct Envelope {
            stream: String,
        }
        if let Ok(e) = serde_json::from_slice::<Envelope>(line) {
            read += 1;
            if let Some(id) = e.stream.strip_prefix("job-") {
                jobs.extend(Uuid::parse_str(id).ok());
            }
        }
    }
    Ok((read >= lost).then_some(jobs))
}

/// Jobs submitted in the kept record that have not ended there.
fn unended_jobs(log: &EventLog) -> Result<BTreeSet<Uuid>> {
    const ENDINGS: &[&str] = &[
        "JobSucceeded",
        "JobFailed",
        "JobCancelled",
        "JobInterrupted",
    ];
    let mut open: BTreeMap<Uuid, ()> = BTreeMap::new();
    let mut from = 1;
    loop {
        let batch = log.read_all(from, 4096)?;
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        for rec in &batch {
            let interesting =
                rec.event_type == "JobSubmitted" || ENDINGS.contains(&rec.event_type.as_str());
            if !interesting {
                continue;
            }
            match HerdEvent::from_recorded(&crate::state::stored(rec)) {
                Ok(HerdEvent::JobSubmitted { job, .. }) => {
                    open.insert(job, ());
                }
                Ok(HerdEvent::JobInterrupted { requeued: true, .. }) => {}
                Ok(e) => {
                    if let Some(job) = e.job() {
                        open.remove(&job);
                    }
                }
                Err(_) => {} // `verify` and the views report undecodable events
            }
        }
    }
    Ok(open.into_keys().collect())
}
