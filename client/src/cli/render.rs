//! How the CLI shows things to a person: one-line job rows, rounds, lineage
//! trees; `--json` prints the typed value instead.

use super::*;

pub(super) fn print(json_mode: bool, v: &impl serde::Serialize, human: impl FnOnce()) {
    if json_mode {
        println!("{}", serde_json::to_string_pretty(v).expect("json"));
    } else {
        human();
    }
}

pub(super) fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

pub(super) fn job_row(j: &Job) -> String {
    let metrics: Vec<String> = j
        .last_metrics
        .iter()
        .filter(|(k, _)| {
            [
                "loss",
                "accuracy",
                "reward_accuracy",
                "task_accuracy",
                "win_rate",
                "heldout_accuracy",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| format!("{k}={:.4}", v.1))
        .collect();
    format!(
        "{:<36}  {:<9} {:<10} {:<14} {}",
        j.id,
        j.kind,
        j.status,
        short(&j.name),
        metrics.join(" ")
    )
}

pub(super) fn print_round(r: &RoundDetail) {
    println!("round {} (index {})", r.round.id, r.round.index);
    for j in &r.jobs {
        println!("  {}", job_row(j));
    }
}

pub(super) fn print_lineage(v: &LineageNode, depth: usize) {
    let pad = "  ".repeat(depth);
    println!(
        "{pad}{} {} ({})",
        v.artifact.map_or("(kind not recorded)", |a| a.as_str()),
        v.name,
        short(&v.hash)
    );
    if let Some(job) = &v.job {
        println!("{pad}  <- {} job {} ({})", job.kind, job.name, job.id);
        for (name, child) in &job.inputs {
            print!("{pad}    {name}: ");
            print_lineage(child, depth + 3);
        }
    }
}

pub(super) fn short_val(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars().take(26).collect()
}
