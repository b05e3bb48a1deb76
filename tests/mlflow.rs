//! The MLflow-compatible door: what an MLflow client sends, over HTTP, as
//! MLflow's REST API spells it, lands in herd's record (an experiment, an
//! external run with its params, tags and metrics) and reads back in
//! MLflow's shapes and through herd's own API. With a Python that has the
//! `mlflow` package (HERD_PYTHON, else python3), MLflow's own client logs a
//! run too; without one that part says loudly it was skipped.

mod common;

use common::*;
use herd_client::ClientError;
use serde_json::{json, Value};

const API: &str = "/api/2.0/mlflow";

fn code(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn an_mlflow_client_logs_into_herd() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = d.client();
    let exp = c
        .post(
            &format!("{API}/experiments/create"),
            &json!({"name": "mlf"}),
        )
        .unwrap()["experiment_id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = c
        .get(&format!(
            "{API}/experiments/get-by-name?experiment_name=mlf"
        ))
        .unwrap();
    assert_eq!(got["experiment"]["experiment_id"], exp.as_str());
    let (status, message) = code(c.get(&format!(
        "{API}/experiments/get-by-name?experiment_name=nope"
    )));
    assert_eq!(status, 404);
    assert!(
        message.contains("RESOURCE_DOES_NOT_EXIST") || message.contains("no experiment"),
        "{message}"
    );
    assert_eq!(
        code(c.post(
            &format!("{API}/experiments/create"),
            &json!({"name": "mlf"})
        ))
        .0,
        409
    );

    let run = c
        .post(
            &format!("{API}/runs/create"),
            &json!({"experiment_id": exp, "run_name": "trainer", "start_time": 1,
                    "tags": [{"key": "team", "value": "post-training"}]}),
        )
        .unwrap();
    let id = run["run"]["info"]["run_id"].as_str().unwrap().to_string();
    assert_eq!(run["run"]["info"]["status"], "RUNNING");
    c.post(
        &format!("{API}/runs/log-batch"),
        &json!({"run_id": id,
                "params": [{"key": "learning_rate", "value": "0.0003"}, {"key": "optim", "value": "adamw"}],
                "metrics": [{"key": "loss", "value": 2.5, "timestamp": 5, "step": 1},
                            {"key": "loss", "value": 1.5, "timestamp": 6, "step": 2}]}),
    )
    .unwrap();
    c.post(
        &format!("{API}/runs/log-metric"),
        &json!({"run_id": id, "key": "loss", "value": 1.0, "timestamp": 7, "step": 3}),
    )
    .unwrap();
    c.post(
        &format!("{API}/runs/log-parameter"),
        &json!({"run_id": id, "key": "epochs", "value": "3"}),
    )
    .unwrap();
    c.post(
        &format!("{API}/runs/set-tag"),
        &json!({"run_id": id, "key": "stage", "value": "sft"}),
    )
    .unwrap();
    // Params never change; a NaN is refused; nothing of either is recorded.
    let (status, _) = code(c.post(
        &format!("{API}/runs/log-parameter"),
        &json!({"run_id": id, "key": "epochs", "value": "4"}),
    ));
    assert_eq!(status, 400);
    let history = c
        .get(&format!(
            "{API}/metrics/get-history?run_id={id}&metric_key=loss"
        ))
        .unwrap();
    let steps: Vec<(u64, f64)> = history["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["step"].as_u64().unwrap(), m["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(steps, [(1, 2.5), (2, 1.5), (3, 1.0)]);

    // Searched with a filter, then finished.
    let found = c
        .post(
            &format!("{API}/runs/search"),
            &json!({"experiment_ids": [exp], "filter": "metrics.loss < 1.5 and params.optim = 'adamw'"}),
        )
        .unwrap();
    assert_eq!(found["runs"].as_array().unwrap().len(), 1, "{found}");
    let none = c
        .post(
            &format!("{API}/runs/search"),
            &json!({"experiment_ids": [exp], "filter": "metrics.loss > 5"}),
        )
        .unwrap();
    assert!(none["runs"].as_array().unwrap().is_empty());
    let ended = c
        .post(
            &format!("{API}/runs/update"),
            &json!({"run_id": id, "status": "FINISHED", "end_time": 9}),
        )
        .unwrap();
    assert_eq!(ended["run_info"]["status"], "FINISHED");
    let got = c.get(&format!("{API}/runs/get?run_id={id}")).unwrap();
    let params: Vec<(String, String)> = got["run"]["data"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap().into(),
                p["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        params.contains(&("optim".into(), "adamw".into())),
        "{params:?}"
    );
    assert!(
        params.contains(&("epochs".into(), "3".into())),
        "{params:?}"
    );

    // herd's own view: an external run in the experiment, numbers as
    // numbers (history filters on them), tags kept.
    let j = c.job(&id).unwrap();
    assert_eq!(j.status, herd_client::JobStatus::Succeeded);
    assert_eq!(j.hyperparameters["learning_rate"], json!(0.0003));
    assert_eq!(j.tags["team"], "post-training");
    assert_eq!(j.last_metrics["loss"], (3, 1.0));
    let h = c
        .jobs(&herd_client::JobQuery {
            where_: Some("hp.learning_rate<1e-3".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(h.len(), 1);
    // A closed run takes nothing more.
    assert_eq!(
        code(c.post(
            &format!("{API}/runs/log-metric"),
            &json!({"run_id": id, "key": "loss", "value": 0.5, "step": 4}),
        ))
        .0,
        409
    );
    // Any other MLflow call: 501 naming it.
    let (status, message) = code(c.post(&format!("{API}/runs/delete"), &json!({"run_id": id})));
    assert_eq!(status, 501);
    assert!(message.contains("runs/delete"), "{message}");
    mlflow_client_logs(&d);
}

/// MLflow's own Python client against herd, if there is one.
fn mlflow_client_logs(d: &Daemon) {
    let Some(python) = system::python_with("mlflow", "mlflow_client_logs", "HERD_REQUIRE_MLFLOW")
    else {
        return;
    };
    // Params, tags, single metrics and 10k points in batches of 1,000,
    // then the run ended and its history read back through MLflow.
    let script = r#"
import mlflow, time
from mlflow.entities import Metric
mlflow.set_experiment('from-mlflow')
with mlflow.start_run(run_name='py') as run:
    mlflow.log_params({'lr': 1e-4, 'beta': 0.1})
    mlflow.set_tag('k', 'v')
    for s in range(5): mlflow.log_metric('loss', 1.0 / (s + 1), step=s)
    mlflow.log_metric('diverged', float('nan'), step=1)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for b in range(10):
        client.log_batch(run.info.run_id, metrics=[Metric('reward', float(i), now, i) for i in range(b * 1000, (b + 1) * 1000)])
history = mlflow.MlflowClient().get_metric_history(run.info.run_id, 'reward')
assert len(history) == 10000, len(history)
assert sorted(m.step for m in history)[-1] == 9999
got = mlflow.MlflowClient().get_run(run.info.run_id)
assert got.data.params['beta'] == '0.1', got.data.params
assert got.info.status == 'FINISHED', got.info.status
# output_format='list': the default returns a pandas frame, and pandas is not
# a dependency of mlflow-skinny.
found = mlflow.search_runs(experiment_names=['from-mlflow'], filter_string="attributes.run_name = 'py'", output_format='list')
assert [r.info.run_id for r in found] == [run.info.run_id], found
"#;
    run_with_mlflow(d, &python, script, &[]);
    let c = d.client();
    let runs = external_runs(&c);
    let py = runs
        .iter()
        .find(|j| j.name == "py")
        .expect("the run MLflow logged");
    assert_eq!(py.status, herd_client::JobStatus::Succeeded);
    assert_eq!(py.last_metrics["loss"], (4, 0.2));
    assert_eq!(py.hyperparameters["beta"], json!(0.1));
    assert_eq!(py.last_metrics["reward"], (9999, 9999.0));
    assert!(py.last_metrics["diverged"].1.is_nan(), "NaN kept as NaN");
    // In herd's history with its params, filtered on them.
    let h = c
        .jobs(&herd_client::JobQuery {
            where_: Some("hp.beta>0.05".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(h.iter().any(|j| j.id == py.id));
}

/// transformers' Trainer with `report_to="mlflow"`, pointed at herd by
/// MLFLOW_TRACKING_URI alone: its params, losses and end land in herd's
/// record, and `herd history` and `herd plot` show the run.
#[test]
fn a_transformers_trainer_reports_to_herd() {
    let Some(python) = system::python_with(
        "mlflow, torch, transformers",
        "a_transformers_trainer_reports_to_herd",
        "HERD_REQUIRE_MLFLOW",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    // A tiny Llama trained for 6 steps on random tokens, logging each step.
    let script = r#"
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
model = LlamaForCausalLM(config)
rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 8))]
args = TrainingArguments(output_dir=OUT, max_steps=6, logging_steps=1, per_device_train_batch_size=2,
                         learning_rate=1e-3, report_to=["mlflow"], run_name="hf-tiny",
                         save_strategy="no", use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=rows).train()
"#
    .replace("OUT", &format!("{:?}", dir.path().join("hf").to_str().unwrap()));
    run_with_mlflow(
        &d,
        &python,
        &script,
        &[
            ("MLFLOW_EXPERIMENT_NAME", "hf"),
            ("HF_HUB_OFFLINE", "1"),
            ("TOKENIZERS_PARALLELISM", "false"),
        ],
    );
    let c = d.client();
    let runs = external_runs(&c);
    let run = runs
        .iter()
        .find(|j| j.name == "hf-tiny")
        .unwrap_or_else(|| panic!("the Trainer's run in {runs:?}"));
    assert_eq!(
        run.status,
        herd_client::JobStatus::Succeeded,
        "ended by the callback"
    );
    assert_eq!(run.hyperparameters["learning_rate"], json!(0.001));
    let loss = &c.metrics(&run.id.to_string(), &["loss"]).unwrap()["loss"];
    assert_eq!(
        loss.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    assert!(
        loss.iter().all(|p| p.1.is_finite() && p.1 > 0.0),
        "{loss:?}"
    );
    // The CLI shows it as any other job.
    let history = d.herd(&["history", "--experiment", "hf"]);
    let text = String::from_utf8_lossy(&history.stdout);
    assert!(
        history.status.success() && text.contains("hf-tiny"),
        "{text}"
    );
    let svg = dir.path().join("hf.svg");
    let plot = d.herd(&["plot", &run.id.to_string(), "--out", svg.to_str().unwrap()]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("loss"));
}

/// Run a Python script with MLflow pointed at `d` (its URI and token, no
/// retries) and `env`; it must succeed.
fn run_with_mlflow(d: &Daemon, python: &str, script: &str, env: &[(&str, &str)]) {
    let token = std::fs::read_to_string(d.dir.join("token")).unwrap();
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .env(
            "MLFLOW_TRACKING_URI",
            format!("http://{}", d.addr.trim_start_matches("http://")),
        )
        .env("MLFLOW_TRACKING_TOKEN", token.trim())
        .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{python}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn external_runs(c: &herd_client::Client) -> Vec<herd_client::Job> {
    c.jobs(&herd_client::JobQuery {
        kind: Some(herd_client::JobKind::External),
        ..Default::default()
    })
    .unwrap()
}
