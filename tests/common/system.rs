//! What tests that need a system service share: finding programs,
//! installing Debian packages where we can (root with apt-get, once per
//! test binary), free ports, and skipping loudly where we cannot.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(program).is_file()
        || Path::new("/usr/bin").join(program).is_file()
}

/// This process's user id, as `id -u` says it.
pub fn uid() -> String {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `apt-get install` these packages, once per test binary (apt-get update
/// first only if that fails: a fresh machine may have no package lists).
pub fn apt_install_once(packages: &[&str]) -> Result<(), String> {
    static DONE: Mutex<Vec<(String, Result<(), String>)>> = Mutex::new(vec![]);
    let key = packages.join(" ");
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = done.iter().find(|(k, _)| *k == key) {
        return r.clone();
    }
    let result = (|| {
        let uid = uid();
        if uid != "0" {
            return Err(format!(
                "not root (uid {uid}), so they cannot be installed here"
            ));
        }
        if !which("apt-get") {
            return Err("no apt-get to install them with".into());
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
        };
        eprintln!("installing {key} with apt-get for the tests that need it");
        let mut out = install().map_err(|e| format!("apt-get: {e}"))?;
        if !out.status.success() {
            let _ = Command::new("apt-get").args(["update", "-q"]).output();
            out = install().map_err(|e| format!("apt-get: {e}"))?;
        }
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(format!(
                "apt-get install {key} failed: {}",
                err.trim().lines().last().unwrap_or("")
            ))
        }
    })();
    done.push((key, result.clone()));
    result
}

/// Say loudly that `test` did not run and why: straight to fd 2 (the test
/// harness captures eprintln! and shows it only for failures) and to
/// `$HERD_SKIP_LOG` for `.ci/run`'s summary. With `require` set to 1 in the
/// environment (`.ci/run` sets it once it installed what is needed), a
/// skip is a failure instead.
pub fn skip(test: &str, why: &str, require: &str) {
    if std::env::var(require).as_deref() == Ok("1") {
        panic!("{test}: {require}=1 but {why}");
    }
    let line = format!("SKIPPED {test}: {why}");
    use std::io::Write;
    let bang = "!".repeat(72);
    let _ = writeln!(std::io::stderr(), "\n{bang}\n{line}\n{bang}");
    if let Ok(log) = std::env::var("HERD_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// HERD_PYTHON (else python3) when it imports `modules` (the ecosystem's
/// loaders, which the project does not depend on); else None, having said
/// loudly that `test` was skipped (a failure with `require` set to 1).
pub fn python_with(modules: &str, test: &str, require: &str) -> Option<String> {
    let python = std::env::var("HERD_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        skip(
            test,
            &format!("{python} cannot import {modules} (set HERD_PYTHON)"),
            require,
        );
    }
    has.then_some(python)
}
