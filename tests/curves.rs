//! Curves at any length, over HTTP: a long series sampled for a chart's
//! width keeps its spike, its NaN and its infinity; a zoomed window comes
//! back whole; bad sample queries say which parameter is wrong; and the
//! answers are the same after a restart, from the stored block summaries.

mod common;

use common::*;
use herd_client::ClientError;

const POINTS: u64 = 200_000;

fn value(step: u64) -> f64 {
    match step {
        123_457 => 1e6,
        150_000 => f64::NAN,
        170_001 => f64::NEG_INFINITY,
        _ => (step % 1000) as f64 / 1000.0,
    }
}

fn same_bits(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
}

#[test]
fn a_long_series_is_sampled_zoomed_and_keeps_its_non_finite_points() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let c = d.client();
    let id = c
        .open_run("long", None, &serde_json::json!({"lr": 1e-4}))
        .unwrap();
    for chunk in (1..=POINTS).collect::<Vec<_>>().chunks(50_000) {
        let points: Vec<(u64, &str, f64)> = chunk.iter().map(|&s| (s, "loss", value(s))).collect();
        c.log_metrics(&id, &points).unwrap();
    }
    c.log_metrics(&id, &[(POINTS, "grad_norm", f64::NAN)])
        .unwrap();
    c.close_run(&id, true, "").unwrap();

    let check = |c: &herd_client::Client| {
        let got = c.sampled_metrics(&id, &["loss"], 500, None, None).unwrap();
        assert_eq!(got.counts["loss"], POINTS);
        let loss = &got.series["loss"];
        assert!(
            loss.len() <= 2 * 500 + 3,
            "{} points for 500 pixels",
            loss.len()
        );
        assert_eq!(loss.first().unwrap().0, 1, "the first point");
        assert_eq!(loss.last().unwrap().0, POINTS, "the last point");
        assert!(loss.contains(&(123_457, 1e6)), "the spike");
        assert!(
            loss.iter().any(|p| p.0 == 150_000 && p.1.is_nan()),
            "the NaN"
        );
        assert!(loss.contains(&(170_001, f64::NEG_INFINITY)), "-inf");
        assert!(loss.windows(2).all(|w| w[0].0 < w[1].0), "in step order");

        // Zoomed in, 401 points fit 500 pixels: all of them.
        let zoom = c
            .sampled_metrics(&id, &["loss"], 500, Some(123_000), Some(123_400))
            .unwrap();
        let want: Vec<(u64, f64)> = (123_000..=123_400).map(|s| (s, value(s))).collect();
        assert_eq!(zoom.counts["loss"], 401);
        assert!(same_bits(&zoom.series["loss"], &want), "the window, whole");
        let around_nan = c
            .sampled_metrics(&id, &[], 1000, Some(149_990), Some(150_010))
            .unwrap();
        assert!(around_nan.series["loss"][10].1.is_nan());

        // The whole series, as recorded, NaN written as text.
        let raw = c
            .get(&format!(
                "/jobs/{id}/metrics?name=loss&points=10&from=150000&to=150000"
            ))
            .unwrap();
        assert_eq!(raw["series"]["loss"][0][1], "NaN", "{raw}");
        let whole = c.metrics(&id, &["loss"]).unwrap();
        assert_eq!(whole["loss"].len() as u64, POINTS);
        assert!(whole["loss"][169_999 + 1].1 == f64::NEG_INFINITY);
    };
    check(&c);

    // herd's own series (when each batch was recorded) is listed only when
    // asked for, and no run may log into it.
    let all = c.metrics(&id, &[]).unwrap();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["grad_norm", "loss"]);
    let elapsed = &c.metrics(&id, &["@elapsed_s"]).unwrap()["@elapsed_s"];
    // One point per recorded event (of up to 1,000 points), at its last step.
    assert_eq!(elapsed.len() as u64, POINTS / 1000 + 1);
    assert_eq!(elapsed[0].0, 1000);
    assert!(elapsed.windows(2).all(|w| w[0].1 <= w[1].1), "{elapsed:?}");
    match c.log_metrics(&id, &[(1, "@elapsed_s", 0.0)]) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("herd's own series"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // Many jobs in one request, each sampled the same way.
    let many = c
        .get(&format!("/metrics?jobs={id},{id}&names=loss&points=500"))
        .unwrap();
    assert_eq!(many["jobs"][&id]["counts"]["loss"], POINTS);
    let many_ids = vec![id.clone(); 20].join(",");
    match c.get(&format!("/metrics?jobs={many_ids}&points=100000")) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("20 jobs x 100000 points"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match c.get("/metrics?jobs=nope&points=5") {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 400);
            assert!(message.contains("\"nope\" is not a job id"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    for (query, says) in [
        ("points=0", "query `points`: 1 to 100000"),
        ("points=10&from=9&to=3", "`from` (9) is after `to` (3)"),
        ("from=3", "give `points` too"),
        ("points=10&width=3", "unknown field `width`"),
    ] {
        match c.get(&format!("/jobs/{id}/metrics?{query}")) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 400, "{query}: {message}");
                assert!(message.contains(says), "{query}: {message}");
            }
            other => panic!("{query}: {other:?}"),
        }
    }

    // After a restart the job's series come from the stored summaries.
    d.terminate();
    let d = Daemon::start(dir.path());
    check(&d.client());
    // The job's view keeps its last values through the view store, a NaN
    // as well.
    let view = d.client().job(&id).unwrap();
    assert_eq!(view.last_metrics["loss"], (POINTS, 0.0));
    assert!(view.last_metrics["grad_norm"].1.is_nan());
}
