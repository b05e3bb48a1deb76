//! Commands about the daemon and its record as a whole: status, verify,
//! the dashboard's login link, and the note every view of the record adds
//! when history was repaired.

use serde_json::json;

use super::render::print;
use crate::{Client, ClientError, Result};

/// `herd dashboard`: a one-time login link, opened where a browser is.
pub(super) fn dashboard(c: &Client, no_open: bool, js: bool) -> Result<()> {
    let v = c.post("/dashboard/codes", &json!({}))?;
    let url = v["url"].as_str().unwrap_or_default().to_string();
    print(js, &v, || println!("{url}"));
    // $BROWSER, else xdg-open where there is a display; never fatal.
    let opener = std::env::var("BROWSER").ok().or_else(|| {
        (std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some())
            .then(|| "xdg-open".to_string())
    });
    if let (false, Some(o)) = (no_open, opener) {
        let _ = std::process::Command::new(o)
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    Ok(())
}

/// `herd verify`: the event chain and every blob, checked by the daemon.
pub(super) fn verify(c: &Client, js: bool) -> Result<()> {
    let v = c.verify()?;
    print(js, &v, || {
        if v.ok {
            println!(
                "ok: {} events chained, {} blobs ({} bytes) verified, {} artifacts present",
                v.report["chain"]["events"],
                v.report["blobs"]["blobs"],
                v.report["blobs"]["bytes"],
                v.report["artifacts_checked"]
            );
        } else {
            println!("BROKEN:");
            v.problems.iter().for_each(|p| println!("  {p}"));
        }
        repairs_note(&v.report["repairs"]);
    });
    if !v.ok {
        return Err(ClientError::Api {
            status: 0,
            message: format!("store verification failed: {}", v.error),
        });
    }
    Ok(())
}

/// `herd status`: devices and job counts.
pub(super) fn status(c: &Client, js: bool) -> Result<()> {
    let v = c.status()?;
    print(js, &v, || {
        let devices: Vec<String> = v["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(String::from))
            .collect();
        println!("herdd at {} — devices: {}", c.server(), devices.join(", "));
        let jobs = &v["jobs"];
        println!(
            "jobs: {} queued, {} running, {} succeeded, {} failed, {} cancelled, {} interrupted",
            jobs["queued"],
            jobs["running"],
            jobs["succeeded"],
            jobs["failed"],
            jobs["cancelled"],
            jobs["interrupted"]
        );
        println!("events recorded: {}", v["head_seq"]);
        repairs_note(&v["repairs"]);
    });
    Ok(())
}

/// Print each recorded loss (`herdd repair --accept-loss`): whatever a
/// command shows of the record, it must not pass for the whole of it.
pub(super) fn repairs_note(repairs: &serde_json::Value) {
    for r in repairs.as_array().into_iter().flatten() {
        if let Some(m) = r["message"].as_str() {
            println!("NOTE: {}", herd_core::vocab::printable(m));
        }
    }
}
