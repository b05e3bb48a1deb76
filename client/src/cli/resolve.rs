//! What people type for an experiment, a round or a job, resolved to ids.
//! An id always works; names are what people remember:
//!
//! * experiment: its id or its (unique) name;
//! * round: its id, or `EXPERIMENT/INDEX`;
//! * job: its id, `EXPERIMENT/NAME` where that name is unique in the
//!   experiment, or `EXPERIMENT/ROUND/NAME`;
//! * job or artifact: a unique prefix of its id or hash, at least 8 hex
//!   characters, as listings print them (an ambiguous one lists its
//!   matches, as git does).

use uuid::Uuid;

use crate::{Client, ClientError, IdMatch, InputRef, Job, JobQuery, Result};

/// Whether `s` can be an id prefix: 8+ hex characters, dashes aside.
fn looks_like_prefix(s: &str) -> bool {
    let hex = s.chars().filter(|c| *c != '-').count();
    hex >= herd_core::wire::MIN_ID_PREFIX && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

/// The one recorded thing of a kind in `what` whose id starts with `prefix`.
fn unique(c: &Client, prefix: &str, what: &[&str]) -> Result<IdMatch> {
    let r = c.resolve(prefix)?;
    let found: Vec<IdMatch> = r
        .matches
        .into_iter()
        .filter(|m| what.contains(&m.what.as_str()))
        .collect();
    let kinds = what.join(" or ");
    match &found[..] {
        [m] => Ok(m.clone()),
        [] => Err(usage(format!("no {kinds} id starts with {prefix}"))),
        several => Err(usage(format!(
            "{prefix} is ambiguous: {}{} {kinds} ids start with it:\n{}\ngive more characters",
            several.len(),
            if r.more { "+" } else { "" },
            several
                .iter()
                .map(|m| format!(
                    "  {} {} {}",
                    m.what,
                    m.id,
                    herd_core::vocab::printable(&m.name)
                ))
                .collect::<Vec<_>>()
                .join("\n")
        ))),
    }
}

/// A content hash, whole or a unique prefix of one.
pub fn hash(c: &Client, s: &str) -> Result<String> {
    if crate::BlobHash::is_valid(s) || !looks_like_prefix(s) {
        return Ok(s.to_string());
    }
    Ok(unique(c, s, &["artifact"])?.id)
}

/// `--input name=REF`: a reference as the daemon takes it, with a short
/// hash expanded first.
pub fn inputs(c: &Client, given: &[(String, String)]) -> Result<Vec<(String, InputRef)>> {
    given
        .iter()
        .map(|(name, text)| {
            let full = match text.parse::<InputRef>() {
                Ok(r) => return Ok((name.clone(), r)),
                Err(e) if !looks_like_prefix(text) => {
                    return Err(usage(format!("--input {name}={text}: {e}")))
                }
                Err(_) => hash(c, text)?,
            };
            let r = full
                .parse::<InputRef>()
                .map_err(|e| usage(format!("--input {name}={text}: {e}")))?;
            Ok((name.clone(), r))
        })
        .collect()
}

/// What `herd show X` names: an artifact (hash or prefix) or a job.
pub enum Shown {
    Artifact(String),
    Job(Uuid),
}

pub fn shown(c: &Client, s: &str) -> Result<Shown> {
    if crate::BlobHash::is_valid(s) {
        return Ok(Shown::Artifact(s.to_string()));
    }
    if s.parse::<Uuid>().is_err() && looks_like_prefix(s) {
        let m = unique(c, s, &["job", "artifact"])?;
        return Ok(match m.what.as_str() {
            "job" => Shown::Job(
                m.id.parse()
                    .map_err(|_| usage(format!("bad job id {}", m.id)))?,
            ),
            _ => Shown::Artifact(m.id),
        });
    }
    job(c, s).map(Shown::Job)
}

fn usage(msg: String) -> ClientError {
    ClientError::Usage(msg)
}

pub fn experiment(c: &Client, s: &str) -> Result<Uuid> {
    if let Ok(id) = s.parse() {
        return Ok(id);
    }
    Ok(c.experiment(s)?.experiment.id)
}

/// `EXPERIMENT/INDEX` -> the round's id.
fn round_in(c: &Client, exp: &str, index: &str) -> Result<Uuid> {
    let n: u32 = index.parse().map_err(|_| {
        usage(format!(
            "{exp}/{index}: a round is named by its index in the experiment (0, 1, ...)"
        ))
    })?;
    let detail = c.experiment(exp)?;
    detail
        .rounds
        .iter()
        .find(|r| r.index == n)
        .map(|r| r.id)
        .ok_or_else(|| {
            usage(format!(
                "experiment {exp:?} has no round {n} (it has {}); `herd experiment show {exp}`",
                detail.rounds.len()
            ))
        })
}

pub fn round(c: &Client, s: &str) -> Result<Uuid> {
    if let Ok(id) = s.parse() {
        return Ok(id);
    }
    match s.split_once('/') {
        Some((exp, index)) => round_in(c, exp, index),
        None => Err(usage(format!(
            "{s:?} is not a round: give its id, or EXPERIMENT/INDEX"
        ))),
    }
}

pub fn job(c: &Client, s: &str) -> Result<Uuid> {
    if let Ok(id) = s.parse() {
        return Ok(id);
    }
    if looks_like_prefix(s) {
        let m = unique(c, s, &["job"])?;
        return m
            .id
            .parse()
            .map_err(|_| usage(format!("bad job id {}", m.id)));
    }
    let parts: Vec<&str> = s.split('/').collect();
    let (exp, round, name) = match parts[..] {
        [exp, name] => (exp, None, name),
        [exp, round, name] => (exp, Some(round), name),
        _ => {
            return Err(usage(format!(
                "{s:?} is not a job: give its id (or 8 or more characters of it), or EXPERIMENT/NAME (EXPERIMENT/ROUND/NAME for a round's job)"
            )))
        }
    };
    let q = JobQuery {
        experiment: Some(experiment(c, exp)?),
        round: round.map(|r| round_in(c, exp, r)).transpose()?,
        ..Default::default()
    };
    let found: Vec<Job> = c.jobs(&q)?.into_iter().filter(|j| j.name == name).collect();
    match &found[..] {
        [j] => Ok(j.id),
        [] => Err(usage(format!(
            "no job named {name:?} in {}; `herd history --experiment {exp}` lists them",
            round.map_or(format!("experiment {exp:?}"), |r| format!("round {exp}/{r}"))
        ))),
        several => Err(usage(format!(
            "{} jobs are named {name:?} in experiment {exp:?}; name one as {exp}/ROUND/{name} or by id: {}",
            several.len(),
            several
                .iter()
                .map(|j| j.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A job or a round (`diff`, `reproduce`): `EXPERIMENT/N` with a number is
/// a round, other names a job; ids pass through as they are.
pub fn job_or_round(c: &Client, s: &str) -> Result<String> {
    if s.parse::<Uuid>().is_ok() {
        return Ok(s.to_string());
    }
    match s.split_once('/') {
        Some((_, n)) if n.parse::<u32>().is_ok() => Ok(round(c, s)?.to_string()),
        _ => Ok(job(c, s)?.to_string()),
    }
}
