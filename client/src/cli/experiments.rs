//! Experiments and rounds: create, list and show experiments; submit a
//! round from a spec file (experiment by name, `--var`), show one.

use super::*;
use crate::RoundSpec;

pub(super) fn experiment(c: &Client, action: &ExperimentAction, js: bool) -> Result<()> {
    match action {
        ExperimentAction::Create { name, description } => {
            let id = c.create_experiment(name, description)?;
            print(js, &json!({"id": id}), || println!("{id}"));
        }
        ExperimentAction::List => {
            let v = c.experiments()?;
            print(js, &v, || {
                for e in &v {
                    println!(
                        "{}  {:<24} rounds={} jobs={}",
                        e.id,
                        herd_core::vocab::printable(&e.name),
                        e.rounds.len(),
                        e.jobs.len()
                    );
                }
            });
        }
        ExperimentAction::Show { id } => {
            let v = c.experiment(id)?;
            print(js, &v, || {
                let e = &v.experiment;
                println!("{} ({})", herd_core::vocab::printable(&e.name), e.id);
                if !e.description.is_empty() {
                    println!("  {}", e.description);
                }
                println!("  {} jobs, {} rounds", e.jobs.len(), v.rounds.len());
                for r in &v.rounds {
                    println!(
                        "  round {}/{}  {}  {} jobs",
                        herd_core::vocab::printable(&e.name),
                        r.index,
                        r.id,
                        r.jobs.len()
                    );
                }
            });
        }
    }
    Ok(())
}

pub(super) fn round(c: &Client, action: &RoundAction, js: bool, quiet: bool) -> Result<()> {
    match action {
        RoundAction::Submit {
            spec,
            vars,
            experiment,
            wait,
        } => {
            let text = crate::read_file(spec)?;
            let mut spec_v: Value = serde_json::from_str(&text).map_err(|e| {
                ClientError::Usage(format!("{}: not valid JSON: {e}", spec.display()))
            })?;
            if !spec_v.is_object() {
                return Err(ClientError::Usage(format!(
                    "{}: a round spec is a JSON object (see examples/round.json)",
                    spec.display()
                )));
            }
            if let Some(e) = experiment {
                spec_v["experiment"] = json!(e);
            }
            for (k, v) in vars {
                if !spec_v["vars"].is_object() {
                    spec_v["vars"] = json!({});
                }
                spec_v["vars"][k] = json!(resolve::hash(c, v)?);
            }
            // The spec may name its experiment.
            if let Some(Value::String(e)) = spec_v.get("experiment").cloned() {
                spec_v["experiment"] = json!(resolve::experiment(c, &e)?);
            }
            // Checked here, so an error names the file it came from.
            let typed: RoundSpec = serde_json::from_value(spec_v)
                .map_err(|e| ClientError::Usage(format!("{}: round spec: {e}", spec.display())))?;
            submit_round(c, &typed, *wait, js, quiet)?;
        }
        RoundAction::Show { id } => {
            let r = c.round(&resolve::round(c, id)?.to_string())?;
            print(js, &r, || print_round(&r));
        }
    }
    Ok(())
}

/// Submit a round spec; with `wait`, follow its jobs and show the round.
pub(super) fn submit_round(
    c: &Client,
    spec: &RoundSpec,
    wait: bool,
    js: bool,
    quiet: bool,
) -> Result<()> {
    let v = c.submit_round(spec)?;
    if wait {
        if quiet {
            println!("{}", v.id);
        }
        let ids: Vec<String> = v.jobs.iter().map(|j| j.to_string()).collect();
        let mut show = crate::progress::Follow::new();
        crate::progress::wait_all(c, &ids, Duration::from_secs(24 * 3600), &mut show)?;
        let r = c.round(&v.id.to_string())?;
        if !quiet {
            print(js, &r, || print_round(&r));
        }
    } else {
        print(js, &v, || println!("{}", v.id));
    }
    Ok(())
}
