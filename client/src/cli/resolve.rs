//! What people type for an experiment, a round or a job, resolved to ids.
//! An id always works; names are what people remember:
//!
//! * experiment: its id or its (unique) name;
//! * round: its id, or `EXPERIMENT/INDEX`;
//! * job: its id, `EXPERIMENT/NAME` where that name is unique in the
//!   experiment, or `EXPERIMENT/ROUND/NAME`.

use uuid::Uuid;

use crate::{Client, ClientError, Job, JobQuery, Result};

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
    let parts: Vec<&str> = s.split('/').collect();
    let (exp, round, name) = match parts[..] {
        [exp, name] => (exp, None, name),
        [exp, round, name] => (exp, Some(round), name),
        _ => {
            return Err(usage(format!(
                "{s:?} is not a job: give its id, or EXPERIMENT/NAME (EXPERIMENT/ROUND/NAME for a round's job)"
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
