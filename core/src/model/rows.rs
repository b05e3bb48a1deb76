//! What every job keeps in memory however long the history: its `JobRow`,
//! the few fields `history` filters and sorts on, with the names of
//! hyperparameters and metrics shared between rows; and `Dirty`, what
//! changed since the daemon last checkpointed its views.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::views::{JobStatus, JobView};
use crate::vocab::JobKind;

/// What history filters and sorts on, kept in memory for every job (a few
/// hundred bytes; names of hyperparameters and metrics are shared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    pub experiment: Option<Uuid>,
    pub round: Option<Uuid>,
    pub kind: JobKind,
    /// What people call the job (names an output's maker without reading
    /// its full view); shared between rows with the same name.
    pub name: Arc<str>,
    pub status: JobStatus,
    pub submitted_seq: u64,
    pub seed: u64,
    /// Numeric hyperparameters, effective where known, else as given
    /// (booleans as 0 and 1), sorted by name.
    pub hp: Box<[(Arc<str>, f64)]>,
    /// Last value of each metric, sorted by name.
    #[serde(with = "crate::number::named_values")]
    pub metrics: Box<[(Arc<str>, f64)]>,
}

impl JobRow {
    pub fn hp(&self, name: &str) -> Option<f64> {
        lookup(&self.hp, name)
    }
    pub fn metric(&self, name: &str) -> Option<f64> {
        lookup(&self.metrics, name)
    }
}

fn lookup(pairs: &[(Arc<str>, f64)], name: &str) -> Option<f64> {
    pairs
        .binary_search_by(|(k, _)| (**k).cmp(name))
        .ok()
        .map(|i| pairs[i].1)
}

/// Names of hyperparameters and metrics, stored once for all rows.
#[derive(Debug, Clone, Default)]
pub struct Names(BTreeSet<Arc<str>>);

impl Names {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        match self.0.get(name) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = Arc::from(name);
                self.0.insert(n.clone());
                n
            }
        }
    }

    /// A row read back from storage, its names shared with every other row.
    pub fn intern(&mut self, mut row: JobRow) -> JobRow {
        for (k, _) in row.hp.iter_mut().chain(row.metrics.iter_mut()) {
            *k = self.get(k);
        }
        row.name = self.get(&row.name);
        row
    }

    /// A row's last metric values (what a metric event changes).
    pub fn metrics(&mut self, j: &JobView) -> Box<[(Arc<str>, f64)]> {
        j.last_metrics
            .iter()
            .map(|(k, v)| (self.get(k), v.1))
            .collect()
    }

    /// The row of a job view.
    pub fn row(&mut self, j: &JobView) -> JobRow {
        let mut hp: Vec<(Arc<str>, f64)> = Vec::new();
        let empty = serde_json::Map::new();
        let given = j.hyperparameters.as_object().unwrap_or(&empty);
        let effective = j.effective_hyperparameters.as_object().unwrap_or(&empty);
        // The effective value where there is one, else the given one.
        let given = given.iter().filter(|(k, _)| !effective.contains_key(*k));
        for (k, v) in given.chain(effective.iter()) {
            if let Some(x) = v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64)) {
                hp.push((self.get(k), x));
            }
        }
        hp.sort_by(|a, b| a.0.cmp(&b.0));
        let metrics = self.metrics(j);
        JobRow {
            experiment: j.experiment,
            round: j.round,
            kind: j.kind,
            name: self.get(&j.name),
            status: j.status,
            submitted_seq: j.submitted_seq,
            seed: j.seed,
            hp: hp.into(),
            metrics,
        }
    }
}

/// What changed since the last checkpoint of the daemon's view store.
#[derive(Debug, Clone, Default)]
pub struct Dirty {
    pub experiments: BTreeSet<Uuid>,
    pub rounds: BTreeSet<Uuid>,
    pub jobs: BTreeSet<Uuid>,
    pub artifacts: BTreeSet<String>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.experiments.is_empty()
            && self.rounds.is_empty()
            && self.jobs.is_empty()
            && self.artifacts.is_empty()
    }
}
