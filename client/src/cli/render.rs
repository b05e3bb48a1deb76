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
        .filter(|(k, _)| super::jobs::KEY_METRICS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={}", num(v.1)))
        .collect();
    format!(
        "{:<36}  {:<9} {:<10} {:<14} {}",
        j.id,
        j.kind,
        j.status,
        short(&herd_core::vocab::printable(&j.name)),
        metrics.join(" ")
    )
}

/// Job kinds: one line each, or every detail of one.
pub(super) fn kinds(all: &[crate::KindInfo], detail: bool) {
    for k in all {
        let inputs: Vec<String> = k
            .inputs
            .iter()
            .map(|i| {
                let accepts: Vec<&str> = i.accepts.iter().map(|a| a.as_str()).collect();
                let opt = if i.required { "" } else { "?" };
                format!("{}{opt} ({})", i.name, accepts.join("|"))
            })
            .chain(k.at_least.map(|n| {
                let accepts: Vec<&str> = k.at_least_accepts.iter().map(|a| a.as_str()).collect();
                format!("{n}+ any names ({})", accepts.join("|"))
            }))
            .collect();
        let outputs: Vec<String> = k
            .outputs
            .iter()
            .map(|o| match (&o.artifact, &o.same_as) {
                (Some(a), _) => format!("{} ({})", o.name, a.as_str()),
                (None, Some(i)) if i == "*" => format!("{} (kind of its inputs)", o.name),
                (None, Some(i)) => format!("{} (kind of {i})", o.name),
                _ => o.name.clone(),
            })
            .collect();
        if !detail {
            println!(
                "{:<9} {} -> {}",
                k.kind.as_str(),
                inputs.join(", "),
                if outputs.is_empty() {
                    "metrics only".into()
                } else {
                    outputs.join(", ")
                }
            );
            continue;
        }
        println!("{}", k.kind.as_str());
        println!("  inputs:  {}", inputs.join(", "));
        println!(
            "  outputs: {}",
            if outputs.is_empty() {
                "none (metrics and a summary)".into()
            } else {
                outputs.join(", ")
            }
        );
        println!("  hyperparameters (default):");
        for (n, v) in k.hyperparameters.as_object().into_iter().flatten() {
            let range = k.ranges.get(n).map_or("", |r| r.as_str());
            println!("    {n:<24} {:<12} {range}", v.to_string());
        }
    }
}

pub(super) fn print_round(r: &RoundDetail) {
    println!("round {} (index {})", r.round.id, r.round.index);
    for j in &r.jobs {
        // A point an average ranked and did not keep says so.
        let left_by: Vec<&str> = r
            .jobs
            .iter()
            .filter(|x| x.left_out().iter().any(|(_, id)| *id == j.id))
            .map(|x| x.name.as_str())
            .collect();
        let mark = if left_by.is_empty() {
            String::new()
        } else {
            format!("  (not kept by {})", left_by.join(", "))
        };
        println!("  {}{mark}", job_row(j));
    }
}

pub(super) fn short_val(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or(n.to_string(), num),
        other => other.to_string(),
    };
    s.chars().take(26).collect()
}

/// A number as people read it: `1`, `0.1`, `1e-5`, `0.4375` (at most 4
/// significant digits after the point), never `0.30000000000000004`.
pub(super) fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    if x.abs() < 1e-3 || x.abs() >= 1e6 {
        let s = format!("{x:.3e}");
        // 1.000e-5 -> 1e-5, 2.500e-5 -> 2.5e-5
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{e}");
    }
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Whether two recorded values are the same: numbers by value (`1` and
/// `1.0` are the same), everything else exactly.
pub(super) fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Epoch milliseconds as UTC `MM-DD HH:MM`.
pub(super) fn time_of(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Seconds as `42s`, `3m05s`, `2h10m`.
pub(super) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(num(1.0), "1");
        assert_eq!(num(0.1), "0.1");
        assert_eq!(num(0.1 + 0.2), "0.3");
        assert_eq!(num(1e-5), "1e-5");
        assert_eq!(num(2.5e-5), "2.5e-5");
        assert_eq!(num(0.4375), "0.4375");
        assert_eq!(num(5.83391), "5.8339");
        assert_eq!(num(f64::NAN), "NaN");
        assert!(same(&json!(1), &json!(1.0)));
        assert!(!same(&json!(1), &json!(1.5)));
        assert!(!same(&json!("1"), &json!(1)));
        assert_eq!(duration(65_000), "1m05s");
        assert_eq!(time_of(0), "01-01 00:00");
        assert_eq!(time_of(1_796_000_000_000), "11-30 00:53");
    }
}
