//! The web dashboard in a real headless Chromium (`common::browser`):
//! logging in with a one-time code, a live curve, the history's filters and
//! sort, comparing jobs, a round's graph, lineage, cancel from the page, and
//! the cookie and CSRF rules. Screenshots of the main pages go to
//! `target/dashboard-screenshots/`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::browser_or_skip;
use common::*;
use herd_client::{JobQuery, JobStatus};
use serde_json::{json, Value};

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots")
}

/// Set a chart control (`how`, on the element `e`) as a person would, and
/// fire its change handler.
fn set_control(b: &common::browser::Browser, id: &str, how: &str) {
    b.js(&format!(
        "const e = document.getElementById('{id}'); {how}; e.onchange({{target: e}}); return true"
    ));
}

/// A daemon serving its dashboard on a free port: (daemon, dashboard URL).
fn daemon_with_dashboard(dir: &std::path::Path) -> (Daemon, String) {
    let d = Daemon::start_with(
        dir,
        &["--dashboard-listen", "127.0.0.1:0", "--cpu-jobs", "2"],
    );
    let url = d.client().status().unwrap()["dashboard"]
        .as_str()
        .expect("the dashboard is served")
        .to_string();
    (d, url)
}

/// `herd dashboard --no-open`: the one-time login link it prints.
fn login_link(d: &Daemon) -> String {
    let out = d.herd(&["dashboard", "--no-open"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn cookies_codes_and_csrf_guard_the_dashboard_api() {
    let dir = tempfile::tempdir().unwrap();
    let (d, url) = daemon_with_dashboard(dir.path());
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    };
    // No cookie: 401 on every API route; the bearer token does not work here.
    assert_eq!(status(agent.get(&format!("{url}/api/jobs")).call()), 401);
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    assert_eq!(
        status(
            agent
                .get(&format!("{url}/api/jobs"))
                .set("Authorization", &bearer)
                .call()
        ),
        401
    );
    // The page itself carries no data and loads without a session.
    assert_eq!(status(agent.get(&format!("{url}/")).call()), 200);
    // A code works once.
    let link = login_link(&d);
    assert!(link.starts_with(&format!("{url}/login?code=")), "{link}");
    assert!(
        !link.contains(token.trim()),
        "the bearer token never appears in a URL"
    );
    let r = agent.get(&link).call().unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    assert_eq!(status(agent.get(&link).call()), 401, "a used code");
    assert_eq!(
        status(agent.get(&format!("{url}/login?code=nope")).call()),
        401
    );
    // With the cookie: reads work; a change needs the CSRF token too.
    let with = |req: ureq::Request| req.set("Cookie", &session);
    assert_eq!(
        status(with(agent.get(&format!("{url}/api/status"))).call()),
        200
    );
    let csrf: Value = with(agent.get(&format!("{url}/api/session")))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let csrf = csrf["csrf"].as_str().unwrap();
    let c = d.client();
    let (r, _, _, _, sft) = import_fixtures(&c);
    let id = submit_endless_sft(&c, &r, &sft);
    let cancel = format!("{url}/api/jobs/{id}/cancel");
    assert_eq!(
        status(with(agent.post(&cancel)).call()),
        403,
        "no CSRF token"
    );
    assert_eq!(
        status(with(agent.post(&cancel)).set("X-Herd-CSRF", "0000").call()),
        403
    );
    assert_eq!(
        status(
            with(agent.post(&cancel))
                .set("X-Herd-CSRF", csrf)
                .set("Origin", "http://evil.example")
                .call()
        ),
        403,
        "a cross-origin change"
    );
    assert!(!c.job(&id).unwrap().status.is_final());
    assert_eq!(
        status(with(agent.post(&cancel)).set("X-Herd-CSRF", csrf).call()),
        200
    );
    let j = c.wait(&id, Duration::from_secs(60)).unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let Some(b) = browser_or_skip("the_dashboard_in_a_real_browser") else {
        return;
    };
    let shots = screenshots();
    let dir = tempfile::tempdir().unwrap();
    let (d, url) = daemon_with_dashboard(dir.path());
    let c = d.client();

    // Without a session the page says how to get one.
    b.goto(&format!("{url}/"));
    b.wait_for("#login-needed");

    // Some history: a sweep round (three SFTs, the best two averaged), a long
    // SFT to cancel, and an external run whose curve grows.
    let (r, _, _, _, sft) = import_fixtures(&c);
    let exp = c.create_experiment("dash", "the dashboard's test").unwrap();
    let out = d.herd(&[
        "-q",
        "sweep",
        "--experiment",
        "dash",
        "--kind",
        "sft",
        "--input",
        &format!("model={r}"),
        "--input",
        &format!("data={sft}"),
        "--set",
        "batch_size=2",
        "--set",
        "steps=3",
        "--grid",
        "lr=1e-5,1e-4,1e-3",
        "--average-top",
        "2",
        "--by",
        "metric.loss",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let jobs = c.round(&round).unwrap().jobs;
    let (a, bj) = (jobs[0].id.to_string(), jobs[1].id.to_string());
    let average = jobs.iter().find(|j| j.name == "average").unwrap();
    let averaged = average.outputs["checkpoint"].clone();
    let long = submit_endless_sft(&c, &r, &sft);
    let run = c
        .open_run("live", Some(&exp), &json!({"lr": 3e-4}))
        .unwrap();

    // Log in with the one-time code: the cookie is set, the code is spent.
    b.goto(&login_link(&d));
    b.wait_for("#experiments");
    assert!(b.text("#experiments").contains("dash"));
    assert_eq!(
        b.js("return document.cookie"),
        json!(""),
        "HttpOnly: scripts cannot read it"
    );
    b.screenshot(&shots.join("experiments.png"));

    // A running job's curve grows as points are recorded.
    b.goto(&format!("{url}/#/job/{run}"));
    b.wait_for("#cancel");
    let points = |n: u64| {
        (1..=n)
            .map(|s| (s, "loss", 1.0 / s as f64))
            .collect::<Vec<_>>()
    };
    c.log_metrics(&run, &points(5)).unwrap();
    b.until(
        "5 points on the live curve",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.points === '5'",
    );
    c.log_metrics(&run, &points(40)[5..]).unwrap();
    b.until(
        "the curve to grow to 40",
        Duration::from_secs(20),
        "return document.getElementById('chart-loss').dataset.points === '40'",
    );
    b.wait_for("#chart-loss canvas");
    // Away from the cursor the legend shows the last value, not "--"; the
    // step axis has whole-number ticks only.
    let legend = b.js("return document.querySelector('#chart-loss .u-legend').innerText");
    assert!(
        !legend.as_str().unwrap().contains("--") && legend.as_str().unwrap().contains("0.025"),
        "{legend}"
    );
    let ticks = b.js("const u = document.querySelector('#chart-loss'); return [...u.querySelectorAll('.u-axis')].length");
    assert!(ticks.as_u64().unwrap() >= 2, "{ticks}");
    // A metric that sorts first arrives later: its panel goes first, where
    // the page puts it when the job ends, so nothing moves then.
    c.log_metrics(&run, &[(1, "aardvark", 0.5)]).unwrap();
    let panels = "return [...document.querySelectorAll('#charts .chart')].map(c => c.id).join(' ')";
    b.until(
        "the new panel",
        Duration::from_secs(20),
        "return !!document.getElementById('chart-aardvark')",
    );
    assert_eq!(b.js(panels), json!("chart-aardvark chart-loss"));
    b.screenshot(&shots.join("job-live.png"));
    c.close_run(&run, true, "").unwrap();
    b.until(
        "the page to show the run ended",
        Duration::from_secs(20),
        "return !!document.querySelector('h1 [data-status=succeeded]')",
    );
    assert_eq!(b.js(panels), json!("chart-aardvark chart-loss"));
    assert_eq!(
        b.js("return !!document.getElementById('cancel')"),
        json!(false),
        "no Cancel on an ended job"
    );

    // A long curve is asked for at the chart's pixel width: 20k points
    // come back sampled, the NaN is marked; zooming fetches the window at
    // full resolution, a double-click goes back.
    let curve = c.open_run("long", None, &json!({})).unwrap();
    let pts: Vec<(u64, &str, f64)> = (1..=20_000u64)
        .map(|s| {
            (
                s,
                "loss",
                if s == 7_000 {
                    f64::NAN
                } else {
                    1.0 + (s % 100) as f64 / 100.0
                },
            )
        })
        .collect();
    c.log_metrics(&curve, &pts).unwrap();
    c.close_run(&curve, true, "").unwrap();
    b.goto(&format!("{url}/#/job/{curve}"));
    b.wait_for("#chart-loss canvas");
    let sampled = b.js("const c = document.getElementById('chart-loss'); return [c.dataset.count, Number(c.dataset.points), c.dataset.marks]");
    assert_eq!(sampled[0], json!("20000"), "{sampled}");
    assert!(sampled[1].as_u64().unwrap() < 20_000, "sampled: {sampled}");
    assert_eq!(sampled[2], json!("1"), "the NaN is marked: {sampled}");
    b.screenshot(&shots.join("job-long.png"));
    b.js("document.getElementById('chart-loss').plot.setScale('x', {min: 1000, max: 1100}); return true");
    b.until(
        "the zoomed window at full resolution",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return c.dataset.window === '1000-1100' && c.dataset.points === '101'",
    );
    b.screenshot(&shots.join("job-zoomed.png"));
    b.js("document.querySelector('#chart-loss .u-over').dispatchEvent(new MouseEvent('dblclick', {bubbles: true})); return true");
    b.until(
        "the whole curve again",
        Duration::from_secs(20),
        &format!("const c = document.getElementById('chart-loss'); return !c.dataset.window && c.dataset.points === '{}'", sampled[1]),
    );

    // A run an MLflow client logged (MLflow's REST calls, as its client
    // sends them) is a job page like any other.
    let mlflow = "/api/2.0/mlflow";
    let from_mlflow = c
        .post(
            &format!("{mlflow}/runs/create"),
            &json!({"experiment_id": "0", "run_name": "via-mlflow"}),
        )
        .unwrap()["run"]["info"]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let metrics: Vec<serde_json::Value> = (0..30)
        .map(|s| json!({"key": "loss", "value": 1.0 / (1.0 + s as f64), "timestamp": 0, "step": s}))
        .collect();
    c.post(&format!("{mlflow}/runs/log-batch"), &json!({"run_id": from_mlflow, "metrics": metrics, "params": [{"key": "lr", "value": "0.001"}]}))
        .unwrap();
    c.post(
        &format!("{mlflow}/runs/update"),
        &json!({"run_id": from_mlflow, "status": "FINISHED"}),
    )
    .unwrap();
    b.goto(&format!("{url}/#/job/{from_mlflow}"));
    b.until(
        "the MLflow run's page",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.count === '30' && !!document.querySelector('h1 [data-status=succeeded]')",
    );
    assert!(b.text("#hyperparameters").contains("0.001"));

    // By wall time: herd records when each batch arrived, so a run logged
    // in three batches a moment apart is drawn against seconds.
    let timed = c.open_run("timed", None, &json!({})).unwrap();
    for k in 0..3u64 {
        let pts: Vec<(u64, &str, f64)> = (1..=10).map(|s| (k * 10 + s, "loss", s as f64)).collect();
        c.log_metrics(&timed, &pts).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    c.close_run(&timed, true, "").unwrap();
    b.goto(&format!("{url}/#/job/{timed}"));
    b.wait_for("#xaxis");
    set_control(&b, "xaxis", "e.value = 'time'");
    b.until(
        "the curve by wall time",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.x === 'wall time (s)' && !!c.plot",
    );
    let xs: Vec<f64> =
        serde_json::from_value(b.js("return document.getElementById('chart-loss').plot.data[0]"))
            .unwrap();
    assert!(xs.windows(2).all(|w| w[0] <= w[1]), "{xs:?}");
    let span = xs.last().unwrap() - xs.first().unwrap();
    assert!(
        (0.4..30.0).contains(&span),
        "the batches were ~0.6 s apart: {xs:?}"
    );
    // Live, by wall time: a running run's new batches extend the curve,
    // each at the time it was recorded.
    let live = c.open_run("live-timed", None, &json!({})).unwrap();
    c.log_metrics(&live, &[(1, "loss", 1.0)]).unwrap();
    b.goto(&format!("{url}/#/job/{live}"));
    b.until(
        "the live page by wall time",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.x === 'wall time (s)'",
    );
    for k in 1..=2u64 {
        std::thread::sleep(Duration::from_millis(400));
        let pts: Vec<(u64, &str, f64)> = (1..=10).map(|s| (k * 10 + s, "loss", s as f64)).collect();
        c.log_metrics(&live, &pts).unwrap();
    }
    b.until(
        "the live curve to grow by wall time",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return c.dataset.points === '21'",
    );
    let xs: Vec<f64> =
        serde_json::from_value(b.js("return document.getElementById('chart-loss').plot.data[0]"))
            .unwrap();
    assert!(xs.windows(2).all(|w| w[0] <= w[1]), "{xs:?}");
    assert!(
        xs.last().unwrap() - xs.first().unwrap() > 0.6,
        "two batches 0.4 s apart: {xs:?}"
    );
    c.close_run(&live, true, "").unwrap();
    // By tokens seen: an external run has none, and the page says so.
    set_control(&b, "xaxis", "e.value = 'tokens'");
    b.wait_for("#x-fallback");
    b.js("localStorage.removeItem('herd.x'); return true");

    // History: the page shows the server's filter and sort.
    b.goto(&format!("{url}/#/history"));
    b.wait_for("#history");
    b.type_into("#filters input[name=where]", "hp.lr>=1e-5");
    b.type_into("#filters input[name=sort]", "-hp.lr");
    b.click("#filters button[type=submit]");
    b.until("the filtered history", Duration::from_secs(20),
        "return location.hash.includes('sort=-hp.lr') && !!document.querySelector('#history tbody tr')");
    let shown: Vec<String> = serde_json::from_value(
        b.js("return [...document.querySelectorAll('#history tbody tr')].map(r => r.dataset.job)"),
    )
    .unwrap();
    let expected: Vec<String> = c
        .jobs(&JobQuery {
            where_: Some("hp.lr>=1e-5".into()),
            sort: Some("-hp.lr".into()),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(shown, expected);
    assert!(shown.len() >= 4);
    // Numbers stay on one line (1.000e-5 does not wrap).
    assert_eq!(
        b.js("return getComputedStyle(document.querySelector('#history td.num')).whiteSpace"),
        json!("nowrap")
    );
    // The hyperparameter sorted by gets a column (and a few that differ
    // across the page, never more than three).
    b.wait_for("th[data-sort='hp.lr']");
    let hp_columns = b.js("return document.querySelectorAll(\"th[data-sort^='hp.']\").length");
    assert!(
        hp_columns.as_u64().is_some_and(|n| (1..=3).contains(&n)),
        "{hp_columns}"
    );
    // Clicking a sortable header sorts by it.
    b.click("th[data-sort='submitted']");
    b.until(
        "sorted by submission",
        Duration::from_secs(20),
        "return location.hash.includes('sort=submitted')",
    );
    b.screenshot(&shots.join("history.png"));

    // Compare the sweep's two points: overlaid curves, the lr differs.
    b.goto(&format!("{url}/#/history?experiment={exp}"));
    b.click(&format!("input.pick[value='{a}']"));
    b.click(&format!("input.pick[value='{bj}']"));
    b.click("#compare");
    b.wait_for("#compare-hp tr.diff[data-key='lr']");
    b.wait_for("#chart-loss canvas");
    assert_eq!(
        b.js("return document.getElementById('chart-loss').dataset.points"),
        json!("6")
    );
    // Smoothing draws each line twice (raw faint, EMA over it); log y
    // where every value is positive. Both persist across pages.
    set_control(&b, "smooth", "e.value = '0.6'");
    b.until(
        "smoothed lines",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.lines === '4'",
    );
    set_control(&b, "logy", "e.checked = true");
    b.until(
        "a log y axis",
        Duration::from_secs(20),
        "const c = document.getElementById('chart-loss'); return !!c && c.dataset.log === '1'",
    );
    b.screenshot(&shots.join("compare.png"));
    b.js(
        "localStorage.removeItem('herd.smooth'); localStorage.removeItem('herd.logy'); return true",
    );

    // The round as a graph: the average depends on the three points and
    // left out the worst, whose node and edge say so.
    b.goto(&format!("{url}/#/round/{round}"));
    b.wait_for("#round-graph");
    assert_eq!(
        b.js("return document.querySelectorAll('#round-graph .node').length"),
        json!(4)
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#round-graph .edge').length"),
        json!(3)
    );
    let dropped: Vec<String> = jobs
        .iter()
        .filter(|j| j.name != "average" && !average.resolved_inputs.contains_key(&j.name))
        .map(|j| j.id.to_string())
        .collect();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        b.js("return [...document.querySelectorAll('#round-graph .node.left-out')].map(n => n.dataset.job)"),
        json!(dropped)
    );
    assert!(b.text("#round-graph").contains("not kept by average"));
    assert_eq!(
        b.js("return document.querySelectorAll('#round-graph .edge.left-out').length"),
        json!(1)
    );
    assert_eq!(
        b.js("return [...document.querySelectorAll('#round-graph .node')].every(n => n.dataset.status === 'succeeded')"),
        json!(true)
    );
    b.screenshot(&shots.join("round.png"));

    // A grpo job's page shows its rollouts a step at a time.
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What is 2+3?\", \"answer\": \"5\"}\n{\"prompt\": \"Say a word.\", \"answer\": \"a\"}\n",
    )
    .unwrap();
    let prompts = c
        .import_dataset(&prompts, "prompts", "prompts")
        .unwrap()
        .hash;
    let grpo = submit(
        &c,
        &req(
            "grpo",
            &[("policy", &r), ("prompts", &prompts)],
            json!({"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
                   "batch_size": 4, "verifier_rule": "regex", "verifier_pattern": "a"}),
        ),
    );
    let g = c.wait(&grpo, Duration::from_secs(120)).unwrap();
    assert_eq!(g.status, JobStatus::Succeeded, "{:?}", g.error);
    b.goto(&format!("{url}/#/job/{grpo}"));
    b.until(
        "step 1's four samples",
        Duration::from_secs(20),
        "return document.querySelectorAll('#rollouts tr.rollout[data-step=\"1\"]').length === 4",
    );
    assert!(b.text("#rollouts").contains("What is 2+3?"));
    b.js("const i = document.getElementById('rollout-step'); i.value = '2'; i.onchange(); return true");
    b.until(
        "step 2's samples",
        Duration::from_secs(20),
        "return document.querySelectorAll('#rollouts tr.rollout[data-step=\"2\"]').length === 4",
    );
    b.js("document.getElementById('rollouts-card').scrollIntoView(); return true");
    b.screenshot(&shots.join("rollouts.png"));

    // The experiment opens with its rounds at a glance: a round with an
    // eval gives the round chart its one point, and both rounds are listed.
    let eval_round = c
        .submit_round(&json!({"experiment": exp, "seed": 1, "vars": {"policy": r, "prompts": prompts},
            "jobs": [{"name": "eval", "kind": "eval", "inputs": {"policy": "$policy", "prompts": "$prompts"},
                      "hyperparameters": {"max_new_tokens": 4}}]}))
        .unwrap();
    for j in &eval_round.jobs {
        let j = c.wait(&j.to_string(), Duration::from_secs(120)).unwrap();
        assert_eq!(j.status, JobStatus::Succeeded, "{:?}", j.error);
    }
    b.goto(&format!("{url}/#/experiment/{exp}"));
    b.wait_for("#rounds-chart canvas");
    assert_eq!(
        b.js("return document.getElementById('rounds-chart').dataset.points"),
        json!("1")
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#rounds tbody tr[data-round]').length"),
        json!(2)
    );
    assert!(b.text("#rounds").contains("task_accuracy"));
    b.screenshot(&shots.join("experiment.png"));

    // Two rounds side by side: the eval again with longer answers, matched
    // by name, its changed hyperparameter and its accuracy's move shown.
    let longer = c
        .submit_round(&json!({"experiment": exp, "seed": 1, "vars": {"policy": r, "prompts": prompts},
            "jobs": [{"name": "eval", "kind": "eval", "inputs": {"policy": "$policy", "prompts": "$prompts"},
                      "hyperparameters": {"max_new_tokens": 8}}]}))
        .unwrap();
    for j in &longer.jobs {
        c.wait(&j.to_string(), Duration::from_secs(120)).unwrap();
    }
    // (By way of another page: the same hash again would not reload.)
    b.goto(&format!("{url}/#/queue"));
    b.goto(&format!("{url}/#/experiment/{exp}"));
    b.wait_for("#compare-rounds");
    b.click(&format!("input.pick-round[value='{}']", eval_round.id));
    b.click(&format!("input.pick-round[value='{}']", longer.id));
    b.click("#compare-rounds");
    b.wait_for("#round-diff tr.matched[data-job=eval]");
    let changed = b.text("#round-diff tr[data-job=eval] .hp-diff [data-key=max_new_tokens]");
    assert!(changed.contains("4 → 8"), "{changed}");
    let moved = b.text("#round-diff tr[data-job=eval] .metric-deltas [data-metric=task_accuracy]");
    assert!(moved.contains("→"), "{moved}");
    b.screenshot(&shots.join("rounds-compared.png"));

    // Compare many: 50 runs overlaid, one line and one colour each.
    let many: Vec<String> = (0..50)
        .map(|k| {
            let id = c
                .open_run(
                    &format!("many-{k}"),
                    Some(&exp),
                    &json!({"lr": 1e-4 * (k + 1) as f64}),
                )
                .unwrap();
            let pts: Vec<(u64, &str, f64)> = (1..=10)
                .map(|s| (s, "loss", (k + 1) as f64 / s as f64))
                .collect();
            c.log_metrics(&id, &pts).unwrap();
            c.close_run(&id, true, "").unwrap();
            id
        })
        .collect();
    b.goto(&format!("{url}/#/compare?ids={}", many.join(",")));
    b.wait_for("#chart-loss canvas");
    assert_eq!(
        b.js("return document.getElementById('chart-loss').dataset.lines"),
        json!("50")
    );
    let colours = b.js("return new Set([...document.querySelectorAll('#compare-hp th')].map(t => t.style.color).filter(Boolean)).size");
    assert_eq!(colours, json!(50), "one colour per job");
    b.screenshot(&shots.join("compare-many.png"));

    // Lineage of the average: back through both SFTs to the base and data.
    b.goto(&format!("{url}/#/lineage/{averaged}"));
    b.wait_for("#lineage");
    let hashes: Vec<String> = serde_json::from_value(b.js(
        "return [...document.querySelectorAll('#lineage .lineage-node')].map(n => n.dataset.hash)",
    ))
    .unwrap();
    for h in [&averaged, &r, &sft] {
        assert!(hashes.contains(h), "{h} in the lineage {hashes:?}");
    }
    b.screenshot(&shots.join("lineage.png"));

    // Cancel from the job's page (the page sends the CSRF token), after
    // saying yes: the first click only asks.
    b.goto(&format!("{url}/#/job/{long}"));
    b.click("#cancel");
    b.until(
        "the page to ask",
        Duration::from_secs(20),
        "return !document.getElementById('cancel-ask').hidden",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !c.job(&long).unwrap().is_final(),
        "one click does not cancel"
    );
    b.click("#cancel-confirm");
    let j = c.wait(&long, Duration::from_secs(60)).unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    b.until(
        "the page to show it cancelled",
        Duration::from_secs(20),
        "return !!document.querySelector('h1 [data-status=cancelled]')",
    );

    // Queue, artifacts and the store's verification.
    b.goto(&format!("{url}/#/queue"));
    assert_eq!(b.text("#executor"), "local");
    b.goto(&format!("{url}/#/artifact/{sft}"));
    b.wait_for("#rows");
    b.goto(&format!("{url}/#/artifact/{r}"));
    assert!(b.text("#config").contains("\"hidden_size\""));
    b.goto(&format!("{url}/#/store"));
    b.click("#verify");
    b.wait_for("#verification [data-status=succeeded]");
}

/// After `herdd repair --accept-loss`, every page opens with a banner
/// saying what history lost: the pages show only what survived.
#[test]
fn the_dashboard_says_when_history_was_repaired() {
    let Some(b) = browser_or_skip("the_dashboard_says_when_history_was_repaired") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    {
        let (d, _) = daemon_with_dashboard(dir.path());
        for i in 0..5 {
            d.client().create_experiment(&format!("e{i}"), "").unwrap();
        }
    }
    let log = dir.path().join("log").join("events.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&log, lines[..lines.len() - 2].join("\n") + "\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herdd"))
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "repair",
            "--accept-loss",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (d, url) = daemon_with_dashboard(dir.path());
    b.goto(&login_link(&d));
    b.wait_for("#experiments");
    let banner = b.text("#repairs p");
    let n = lines.len();
    assert!(
        banner.contains("History repaired.")
            && banner.contains(&format!(
                "events {}–{n} lost (2 of them acknowledged)",
                n - 1
            )),
        "{banner}"
    );
    b.goto(&format!("{url}/#/history"));
    b.wait_for("#history");
    assert!(b.text("#repairs").contains("history was repaired"));
}

/// The dashboard answers only to its own address (and localhost, and names
/// given with --dashboard-host): a page on another name that resolves here
/// (DNS rebinding) gets 421 on every route, login included. No browser is
/// needed: the requests are written by hand.
#[test]
fn the_dashboard_refuses_hosts_it_is_not() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &[
            "--dashboard-listen",
            "127.0.0.1:0",
            "--dashboard-host",
            "herd.internal",
        ],
    );
    let url = d.client().status().unwrap()["dashboard"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let status_for = |path: &str, host: &str| -> u16 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    for path in ["/", "/login?code=x", "/api/jobs", "/static/app.js"] {
        assert_eq!(status_for(path, "evil.example"), 421, "{path}");
        assert_eq!(
            status_for(path, &format!("evil.example:{port}")),
            421,
            "{path}"
        );
    }
    assert_eq!(status_for("/", &addr), 200);
    assert_eq!(status_for("/", &format!("localhost:{port}")), 200);
    assert_eq!(status_for("/", &format!("herd.internal:{port}")), 200);
    assert_eq!(status_for("/", "herd.internal"), 200);
    // The API's own port is not the dashboard's: Host there is not checked.
    assert!(d.client().status().is_ok());
}
