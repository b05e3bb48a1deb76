//! A round spec expands to a DAG of jobs. `examples/round.json` is a whole
//! Llama 3 round (rm, rejection sampling, sft, dpo, averaging), run by a
//! test; in short:
//!
//! ```json
//! {"experiment": "<uuid>", "seed": 1,
//!  "vars": {"sft_data": "<hash of an sft dataset>"},
//!  "jobs": [{"name": "sft", "kind": "sft", "inputs": {"model": "$policy", "data": "$sft_data"}}],
//!  "final_policy": "sft.checkpoint"}
//! ```
//! An input is `$var` (a round variable), `job.output` (the output of an
//! earlier job of this round: a dependency; split at the last dot, since a
//! sweep point's name carries values like `beta0.2`), or a content hash. `$policy`
//! defaults to the previous round's final policy. (`herd round submit`
//! also takes the experiment by name and `--var name=hash`.)
//!
//! `$all_preferences` stands for many datasets: the preference data every
//! earlier round of the experiment collected (each `annotate` job's `data`).
//! It goes to a job that takes any input names (`mix`): input `NAME` becomes
//! `NAME_r0`, `NAME_r1`, ... by round index (`NAME_r1_2` for a round's second
//! one), recorded as the hashes they were at submit. Llama 3 trains each
//! round's reward model on all preference data so far:
//!
//! ```json
//! {"name": "prefs", "kind": "mix", "inputs": {"earlier": "$all_preferences", "new": "annotate.data"}},
//! {"name": "rm", "kind": "rm", "inputs": {"model": "$base", "data": "prefs.data"}}
//! ```

use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;

use crate::jobs::{self, InputNames, JobKind};
use crate::state::Live;
use herd_core::model::JobStatus;

/// The variable that stands for every earlier round's preference data.
pub const ALL_PREFERENCES: &str = "all_preferences";

/// `$all_preferences` of `experiment`: (input name suffix, reference) for each
/// job of its recorded rounds whose recipe collects preferences (`annotate`), in round order: the output's hash
/// once recorded, `job:<id>/data` while the job may still run; a job that
/// failed or was cancelled has none.
pub fn all_preferences(recorded: &Live, experiment: Uuid) -> Result<Vec<(String, String)>, String> {
    let Some(exp) = recorded.experiments.get(&experiment) else {
        return Ok(vec![]);
    };
    let mut out = vec![];
    for round_id in &exp.rounds {
        let Some(round) = recorded.rounds.get(round_id) else {
            continue;
        };
        let mut found = 0;
        for id in &round.jobs {
            // The row says the kind, its recipe whether it collects
            // preferences: only such jobs' views are read (an ended job's
            // view is on disk).
            let Some(output) = recorded.rows.get(id).and_then(|r| {
                jobs::recipe(r.kind)
                    .ok()
                    .and_then(|recipe| recipe.collects_preferences())
            }) else {
                continue;
            };
            let job = recorded
                .job(*id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    format!("round {} lists job {id}, which has no view", round.index)
                })?;
            let reference = match (job.status, job.outputs.get(output)) {
                (_, Some(hash)) => hash.clone(),
                (JobStatus::Queued | JobStatus::Running, None) => {
                    InputRef::job_output(job.id, output).to_string()
                }
                _ => continue,
            };
            found += 1;
            let suffix = if found == 1 {
                format!("r{}", round.index)
            } else {
                format!("r{}_{found}", round.index)
            };
            out.push((suffix, reference));
        }
    }
    Ok(out)
}
use crate::references::{self, InputRef};

pub use herd_core::wire::{RoundJob, RoundSpec};

/// One job of an expanded round, ready to record.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    pub id: Uuid,
    pub name: String,
    pub kind: JobKind,
    pub inputs: BTreeMap<String, String>,
    pub hyperparameters: Value,
    pub seed: u64,
    pub depends_on: Vec<Uuid>,
    pub priority: i32,
    pub resources: herd_core::Resources,
}

/// Expand a spec. `previous_policy` is the `job:<id>/<output>` reference (or
/// hash) of the last round's final policy, used for `$policy` when unset.
pub fn expand(
    spec: &RoundSpec,
    previous_policy: Option<String>,
    recorded: &Live,
) -> Result<Vec<PlannedJob>, String> {
    let mut vars = spec.vars.clone();
    if !vars.contains_key("policy") {
        if let Some(p) = previous_policy {
            vars.insert("policy".into(), p);
        }
    }
    if spec.jobs.is_empty() {
        return Err("round has no jobs".into());
    }
    let mut planned: Vec<PlannedJob> = vec![];
    let mut by_name: BTreeMap<String, Uuid> = BTreeMap::new();
    for (i, j) in spec.jobs.iter().enumerate() {
        let at = format!("jobs[{i}] ({})", j.name);
        if j.name.is_empty() || j.name.contains('.') || by_name.contains_key(&j.name) {
            return Err(format!(
                "{at}: names must be unique, non-empty, without '.'"
            ));
        }
        herd_core::vocab::check_name(&j.name).map_err(|e| format!("{at}.name: {e}"))?;
        let kind: JobKind = j.kind.parse().map_err(|e| format!("{at}.kind: {e}"))?;
        let hyperparameters = jobs::effective_hyperparameters(kind, &j.hyperparameters)
            .map_err(|e| format!("{at}.hyperparameters: {e}"))?;
        let mut inputs = BTreeMap::new();
        let mut depends_on = vec![];
        for (name, v) in &j.inputs {
            if v.strip_prefix('$') == Some(ALL_PREFERENCES) && !vars.contains_key(ALL_PREFERENCES) {
                if !matches!(jobs::recipe(kind)?.inputs(), InputNames::AtLeast(_)) {
                    return Err(format!(
                        "{at}.inputs.{name}: ${ALL_PREFERENCES} stands for many datasets; give it to a job that takes any input names (mix) and use that job's output"
                    ));
                }
                for (suffix, reference) in all_preferences(recorded, spec.experiment)? {
                    if let Ok(InputRef::JobOutput { job, .. }) = reference.parse::<InputRef>() {
                        if !depends_on.contains(&job) {
                            depends_on.push(job);
                        }
                    }
                    let expanded = format!("{name}_{suffix}");
                    if j.inputs.contains_key(&expanded) {
                        return Err(format!("{at}.inputs: ${ALL_PREFERENCES} in `{name}` expands to `{expanded}`, which is also given"));
                    }
                    inputs.insert(expanded, reference);
                }
                continue;
            }
            let resolved = if let Some(var) = v.strip_prefix('$') {
                vars.get(var).cloned().ok_or_else(|| {
                    format!(
                        "{at}.inputs.{name}: variable ${var} is not set (vars: {})",
                        vars.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                })?
            } else if herd_core::BlobHash::is_valid(v) {
                v.clone()
            } else if let Some((job, out)) = v.rsplit_once('.') {
                let id = by_name.get(job).ok_or_else(|| {
                    format!("{at}.inputs.{name}: {v:?} names no earlier job of this round")
                })?;
                InputRef::job_output(*id, out).to_string()
            } else {
                return Err(format!(
                    "{at}.inputs.{name}: {v:?} is not $var, job.output or a content hash"
                ));
            };
            match resolved
                .parse::<InputRef>()
                .map_err(|e| format!("{at}.inputs.{name}: {e}"))?
            {
                InputRef::JobOutput { job, .. } if !depends_on.contains(&job) => {
                    depends_on.push(job)
                }
                _ => {}
            }
            inputs.insert(name.clone(), resolved);
        }
        let earlier: BTreeMap<Uuid, references::Planned> = planned
            .iter()
            .map(|p| {
                (
                    p.id,
                    references::Planned {
                        kind: p.kind,
                        inputs: &p.inputs,
                        hyperparameters: &p.hyperparameters,
                    },
                )
            })
            .collect();
        references::check_inputs(recorded, &earlier, kind, &inputs)
            .map_err(|e| format!("{at}.inputs: {e}"))?;
        jobs::check_with_inputs(kind, &hyperparameters, &inputs)
            .map_err(|e| format!("{at}.hyperparameters: {e}"))?;
        let id = Uuid::now_v7();
        by_name.insert(j.name.clone(), id);
        planned.push(PlannedJob {
            id,
            name: j.name.clone(),
            kind,
            inputs,
            hyperparameters,
            seed: j.seed.unwrap_or(spec.seed.wrapping_add(i as u64)),
            depends_on,
            priority: j.priority,
            resources: j.resources,
        });
    }
    if let Some(fp) = &spec.final_policy {
        let job = fp.rsplit_once('.').map(|x| x.0).unwrap_or("");
        if !by_name.contains_key(job) {
            return Err(format!("final_policy {fp:?} names no job of this round"));
        }
    }
    Ok(planned)
}

/// `job:<id>/<output>` for a round's final policy, from its recorded spec.
pub fn final_policy_ref(spec: &Value, jobs: &[(Uuid, String)]) -> Option<String> {
    let fp = spec.get("final_policy")?.as_str()?;
    let (job, out) = fp.rsplit_once('.')?;
    let id = jobs.iter().find(|(_, n)| n == job)?.0;
    Some(InputRef::job_output(id, out).to_string())
}
