//! Following jobs while they run, as a person wants to see it: on a terminal
//! one bar per job (elapsed, ETA, tokens/s, key metrics) that stays as a
//! final line when the job ends, like cargo; elsewhere (CI logs, pipes) one
//! plain line per change of state and every few seconds. Always on stderr:
//! stdout stays for ids and `--json`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use uuid::Uuid;

use crate::{Job, JobStatus};

/// Plain lines at most this often per job (besides changes of state).
const LINE_EVERY: Duration = Duration::from_secs(10);

pub struct Follow {
    multi: Option<MultiProgress>,
    bars: BTreeMap<Uuid, ProgressBar>,
    /// Plain mode: what was last printed for each job, and when.
    printed: BTreeMap<Uuid, (JobStatus, u64, Instant)>,
}

impl Default for Follow {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since the Unix epoch (what the daemon's times are in).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn clock(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Elapsed, ETA and tokens/s of a job, as far as they are known.
fn pace(j: &Job) -> String {
    let Some(started) = j.started_ms else {
        return String::new();
    };
    let end = j.finished_ms.unwrap_or_else(now_ms);
    let elapsed = end.saturating_sub(started);
    let mut parts = vec![clock(elapsed)];
    if let Some(p) = j.progress.filter(|p| p.done > 0 && p.total > p.done) {
        let eta = elapsed as f64 * (p.total - p.done) as f64 / p.done as f64;
        parts.push(format!("ETA {}", clock(eta as u64)));
    }
    let steps = j
        .progress
        .map_or(j.last_metrics.get("loss").map_or(0, |l| l.0), |p| p.done);
    if let Some((_, per_step)) = j.last_metrics.get("tokens") {
        if elapsed > 0 && steps > 0 {
            let rate = per_step * steps as f64 / (elapsed as f64 / 1000.0);
            parts.push(format!("{rate:.0} tok/s"));
        }
    }
    parts.join(", ")
}

fn metrics(j: &Job) -> String {
    j.last_metrics
        .iter()
        .filter(|(k, _)| !["lr", "tokens", "grad_norm"].contains(&k.as_str()))
        .take(3)
        .map(|(k, v)| format!("{k}={:.4}", v.1))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Follow {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        Follow {
            multi: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: BTreeMap::new(),
            printed: BTreeMap::new(),
        }
    }

    /// Plain lines whatever stderr is (tests, logs).
    pub fn plain() -> Self {
        Follow {
            multi: None,
            bars: BTreeMap::new(),
            printed: BTreeMap::new(),
        }
    }

    /// Show where `j` is now.
    pub fn update(&mut self, j: &Job) {
        let label = format!("{} {}", j.kind, j.name);
        let (done, total) = j.progress.map_or((0, 0), |p| (p.done, p.total));
        let Some(multi) = &self.multi else {
            let changed = self.printed.get(&j.id).is_none_or(|(s, d, at)| {
                *s != j.status || (*d != done && at.elapsed() >= LINE_EVERY)
            });
            if changed {
                let mut line = format!("{label}: {}", j.status);
                if total > 0 {
                    line += &format!(" {done}/{total}");
                }
                let pace = pace(j);
                if !pace.is_empty() {
                    line += &format!(", {pace}");
                }
                let m = metrics(j);
                if !m.is_empty() {
                    line += &format!(", {m}");
                }
                if let Some(e) = j.error.as_deref().filter(|_| j.is_final()) {
                    line += &format!(": {e}");
                }
                eprintln!("{line}");
                self.printed.insert(j.id, (j.status, done, Instant::now()));
            }
            return;
        };
        let bar = self.bars.entry(j.id).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(0));
            b.set_style(style(false));
            b.set_prefix(label.clone());
            b
        });
        if bar.is_finished() {
            return;
        }
        if total > 0 {
            if bar.length() == Some(0) {
                bar.set_style(style(true));
            }
            bar.set_length(total);
            bar.set_position(done);
        }
        // Progress is reported every few steps; a job that succeeded did
        // all of them.
        if j.status == JobStatus::Succeeded {
            if let Some(len) = bar.length().filter(|l| *l > 0) {
                bar.set_position(len);
            }
        }
        let pace = pace(j);
        let mut msg = j.status.to_string();
        for part in [metrics(j), pace] {
            if !part.is_empty() {
                msg += " ";
                msg += &part;
            }
        }
        bar.set_message(msg);
        if j.is_final() {
            bar.abandon(); // keeps the last line on screen
        }
    }
}

/// A bar's line: the job, then (once the job says how many steps) the bar
/// and its count, then what fits of the status, pace and metrics. Fixed
/// parts come to 50 columns, and the message is cut to the terminal's
/// width, so an 80-column terminal never wraps. No count before the total
/// is known (a queued job is not "0/1").
fn style(known_total: bool) -> ProgressStyle {
    let template = if known_total {
        "{prefix:20!} [{bar:16}] {pos}/{len} {wide_msg}"
    } else {
        "{prefix:20!} {wide_msg}"
    };
    ProgressStyle::with_template(template)
        .expect("template")
        .progress_chars("=> ")
}

/// Wait for every job in `ids` to end, showing their progress.
pub fn wait_all(
    c: &crate::Client,
    ids: &[String],
    timeout: Duration,
    show: &mut Follow,
) -> crate::Result<Vec<Job>> {
    let start = Instant::now();
    loop {
        let jobs = ids
            .iter()
            .map(|id| c.job(id))
            .collect::<crate::Result<Vec<_>>>()?;
        jobs.iter().for_each(|j| show.update(j));
        if jobs.iter().all(|j| j.is_final()) {
            return Ok(jobs);
        }
        if let Some(j) = jobs.iter().find(|_| start.elapsed() > timeout) {
            return Err(crate::ClientError::Usage(format!(
                "job {} still {} after {timeout:?}",
                j.id, j.status
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
