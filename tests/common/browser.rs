//! A headless Chromium driven over the W3C WebDriver protocol, for the
//! dashboard's tests: Debian's `chromium` and `chromium-driver`, the driver
//! on a free loopback port, a fresh profile per browser.
//!
//! The protocol is a handful of JSON calls (new session, navigate, find,
//! click, type, run a script, screenshot), made with the HTTP client the
//! tests already use; a WebDriver crate would bring its own HTTP stack and
//! async runtime into the build for these. Without the packages (and no
//! root to install them) the tests are skipped loudly; `.ci/run` installs
//! them and sets `HERD_REQUIRE_CHROMIUM=1`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::system::{apt_install_once, free_port, skip, which};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    _profile: tempfile::TempDir,
}

/// A browser, or a loud skip saying why there is none.
pub fn browser_or_skip(test: &str) -> Option<Browser> {
    match Browser::start() {
        Ok(b) => Some(b),
        Err(why) => {
            skip(
                test,
                &format!("no headless Chromium: {why}"),
                "HERD_REQUIRE_CHROMIUM",
            );
            None
        }
    }
}

impl Browser {
    pub fn start() -> Result<Browser, String> {
        if !which("chromium") || !which("chromedriver") {
            apt_install_once(&["chromium", "chromium-driver"]).map_err(|e| {
                format!("chromium and chromedriver are not installed and could not be: {e}")
            })?;
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("chromedriver: {e}"))?;
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut b = Browser {
            driver,
            base,
            _profile: profile,
        };
        let start = Instant::now();
        while ureq::get(&format!("{}/status", b.base)).call().is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                return Err("chromedriver did not answer in 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", b._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let v = b.call("POST", "/session", Some(caps))?;
        let id = v["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session: {v}"))?;
        b.base = format!("{}/session/{id}", b.base);
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = ureq::request(method, &url).timeout(Duration::from_secs(60));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let v: Value = match res {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(_, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                return Err(format!("{method} {path}: {}", v["value"]["message"]));
            }
            Err(e) => return Err(format!("{method} {path}: {e}")),
        };
        Ok(v.get("value").cloned().unwrap_or(v))
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})))
            .unwrap();
    }

    /// Run a script in the page; its `return` value.
    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .unwrap()
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no element {css}"))
    }

    /// Wait (up to 20 s) for an element, then click it.
    pub fn click(&self, css: &str) {
        let id = self.wait_for(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})))
            .unwrap();
    }

    /// Wait for an element, clear it and type into it.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.wait_for(css);
        self.call("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .unwrap();
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .unwrap();
    }

    /// The element's visible text (waiting for it).
    pub fn text(&self, css: &str) -> String {
        let id = self.wait_for(css);
        self.call("GET", &format!("/element/{id}/text"), None)
            .unwrap()
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Wait up to 20 s for an element to exist; its id.
    pub fn wait_for(&self, css: &str) -> String {
        let start = Instant::now();
        loop {
            if let Ok(id) = self.find(css) {
                return id;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no element {css} after 20 s; the page says: {}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait up to `timeout` for a script to return true.
    pub fn until(&self, what: &str, timeout: Duration, script: &str) {
        let start = Instant::now();
        while self.js(script) != Value::Bool(true) {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; the page says: {}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", "/screenshot", None).unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.base).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
