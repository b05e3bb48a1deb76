//! The web dashboard: herdd serves a small ES-module app (`assets/dashboard`,
//! compiled into the binary; charts by the vendored uPlot) on a port of its
//! own, and the same typed API under `/api` for it.
//!
//! Why its own port and its own auth: a browser cannot be given the bearer
//! token without putting it where scripts and URLs can leak it. Instead
//! `herd dashboard` asks the API (bearer) for a one-time login code and
//! opens `/login?code=...`; the daemon exchanges the code, once and within
//! two minutes, for a random session id in an `HttpOnly; SameSite=Strict`
//! cookie. On the dashboard port every `/api` request needs that cookie
//! (401 without), and every request that changes something (cancel,
//! reproduce) also needs the session's CSRF token in `X-Herd-CSRF` and, when
//! the browser sends one, an `Origin` equal to the dashboard's own. The
//! main API port keeps bearer auth and knows nothing of cookies.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use warp::http::{header, StatusCode};
use warp::{Filter, Rejection, Reply};

use crate::api::{self, ApiError, Ctx};

/// How long a login code may wait to be used.
const CODE_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Outstanding codes and sessions, at most (oldest dropped first).
const MAX_ENTRIES: usize = 1024;
pub const COOKIE: &str = "herd_session";
pub const CSRF_HEADER: &str = "x-herd-csrf";

struct Session {
    csrf: String,
    expires: Instant,
}

/// Login codes and browser sessions, in memory: a daemon restart logs
/// every browser out (run `herd dashboard` again).
#[derive(Default)]
pub struct Sessions {
    codes: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes as hex, from the kernel.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    hex::encode(bytes)
}

/// Drop expired entries; past the cap, the ones closest to expiring.
fn prune<V>(map: &mut HashMap<String, V>, expires: impl Fn(&V) -> Instant) {
    let now = Instant::now();
    map.retain(|_, v| expires(v) > now);
    while map.len() >= MAX_ENTRIES {
        let oldest = map
            .iter()
            .min_by_key(|(_, v)| expires(v))
            .map(|(k, _)| k.clone())
            .expect("not empty");
        map.remove(&oldest);
    }
}

impl Sessions {
    /// A new one-time login code.
    pub fn new_code(&self) -> String {
        let code = random_hex();
        let mut codes = self.codes.lock().expect("codes lock");
        prune(&mut codes, |e| *e);
        codes.insert(code.clone(), Instant::now() + CODE_TTL);
        code
    }

    /// Exchange a code (once) for a session: (session id, CSRF token).
    fn redeem(&self, code: &str) -> Option<(String, String)> {
        let expires = self.codes.lock().expect("codes lock").remove(code)?;
        if expires <= Instant::now() {
            return None;
        }
        let (id, csrf) = (random_hex(), random_hex());
        let mut sessions = self.sessions.lock().expect("sessions lock");
        prune(&mut sessions, |s| s.expires);
        sessions.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        Some((id, csrf))
    }

    /// The CSRF token of a live session.
    fn csrf_of(&self, id: &str) -> Option<String> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }
}

fn unauthorized(message: &str) -> Rejection {
    warp::reject::custom(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.into(),
    })
}

fn forbidden(message: &str) -> Rejection {
    warp::reject::custom(ApiError {
        status: StatusCode::FORBIDDEN,
        message: message.into(),
    })
}

/// Equal in constant time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The session cookie (and, for a change, the CSRF token and origin).
fn session(ctx: &Ctx) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    let sessions = ctx.sessions.clone();
    warp::cookie::optional::<String>(COOKIE)
        .and(warp::method())
        .and(warp::header::optional::<String>(CSRF_HEADER))
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("host"))
        .and_then(
            move |cookie: Option<String>,
                  method: warp::http::Method,
                  csrf: Option<String>,
                  origin: Option<String>,
                  host: Option<String>| {
                let sessions = sessions.clone();
                async move {
                    let csrf_of = cookie
                        .as_deref()
                        .and_then(|c| sessions.csrf_of(c))
                        .ok_or_else(|| {
                            unauthorized(
                                "no dashboard session: run `herd dashboard` for a login link",
                            )
                        })?;
                    let safe = matches!(method.as_str(), "GET" | "HEAD");
                    if !safe {
                        if !csrf.as_deref().is_some_and(|c| same(c, &csrf_of)) {
                            return Err(forbidden("missing or wrong X-Herd-CSRF header"));
                        }
                        if let (Some(origin), Some(host)) = (origin, host) {
                            let from = origin.split_once("://").map(|x| x.1).unwrap_or("");
                            if from != host {
                                return Err(forbidden("cross-origin request refused"));
                            }
                        }
                    }
                    Ok::<_, Rejection>(())
                }
            },
        )
        .untuple_one()
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        (
            $name,
            $type,
            include_str!(concat!("../assets/dashboard/", $name)),
        )
    };
}

/// The app's files, compiled in: no Node at build or run time.
const ASSETS: &[(&str, &str, &str)] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("charts.js", "text/javascript; charset=utf-8"),
    asset!("format.js", "text/javascript; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("vendor/uPlot.esm.js", "text/javascript; charset=utf-8"),
    asset!("vendor/uPlot.min.css", "text/css; charset=utf-8"),
];

fn asset(name: &str) -> Option<warp::reply::Response> {
    let (_, content_type, body) = ASSETS.iter().find(|(n, _, _)| *n == name)?;
    let mut r = warp::reply::Response::new((*body).into());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type.parse().expect("valid"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
            .parse()
            .expect("valid"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("valid"),
    );
    h.insert(header::CACHE_CONTROL, "no-cache".parse().expect("valid"));
    Some(r)
}

/// Everything the dashboard port answers.
/// The `Host` values the dashboard answers: its address, `localhost` (and
/// the other loopback spellings) on its port when it listens on loopback,
/// and the names given (a bare name: on the dashboard's port, and as is).
pub fn allowed_hosts(addr: std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let port = addr.port();
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        for h in ["localhost", "127.0.0.1", "[::1]"] {
            hosts.push(format!("{h}:{port}"));
        }
    }
    for h in extra {
        let h = h.trim().to_ascii_lowercase();
        // `name:port` (or `[v6]:port`) as given; a bare name on the
        // dashboard's port, and port-less (a proxy on 80 or 443).
        let has_port = h.rsplit_once(':').is_some_and(|(name, p)| {
            p.parse::<u16>().is_ok() && (!name.contains(':') || name.ends_with(']'))
        });
        if !has_port {
            hosts.push(format!("{h}:{port}"));
        }
        hosts.push(h);
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Refuse a `Host` the dashboard does not answer to (421): a page on
/// another name that resolves here (DNS rebinding) is not the dashboard's
/// origin, whatever its `Origin` says.
fn host_allowed(
    hosts: std::sync::Arc<Vec<String>>,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("host")
        .and_then(move |host: Option<String>| {
            let hosts = hosts.clone();
            async move {
                let h = host.unwrap_or_default().to_ascii_lowercase();
                if hosts.contains(&h) {
                    Ok(())
                } else {
                    Err(warp::reject::custom(ApiError {
                        status: StatusCode::MISDIRECTED_REQUEST,
                        message: format!(
                            "this dashboard does not answer to Host {:?} (it answers to {}; add names with --dashboard-host)",
                            herd_core::vocab::printable(&h),
                            hosts.join(", ")
                        ),
                    }))
                }
            }
        })
        .untuple_one()
}

pub fn routes(
    ctx: Ctx,
    hosts: Vec<String>,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone {
    let sessions = ctx.sessions.clone();
    let login = warp::path!("login")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .map(move |q: HashMap<String, String>| {
            let redeemed = q.get("code").and_then(|c| sessions.redeem(c));
            match redeemed {
                Some((id, _)) => warp::http::Response::builder()
                    .status(StatusCode::SEE_OTHER)
                    .header(header::LOCATION, "/")
                    .header(
                        header::SET_COOKIE,
                        format!(
                            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                            SESSION_TTL.as_secs()
                        ),
                    )
                    .body(warp::hyper::Body::empty())
                    .expect("valid response"),
                None => warp::http::Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .body(
                        "<!doctype html><title>herd</title><p>This login link is unknown, used or expired \
                         (links work once, for two minutes). Run <code>herd dashboard</code> for a new one.</p>"
                            .into(),
                    )
                    .expect("valid response"),
            }
        });
    let sessions = ctx.sessions.clone();
    let session_info = warp::path!("api" / "session")
        .and(warp::get())
        .and(warp::cookie::optional::<String>(COOKIE))
        .and_then(move |cookie: Option<String>| {
            let sessions = sessions.clone();
            async move {
                match cookie.as_deref().and_then(|c| sessions.csrf_of(c)) {
                    Some(csrf) => Ok(warp::reply::json(&json!({"csrf": csrf})).into_response()),
                    None => Err(unauthorized(
                        "no dashboard session: run `herd dashboard` for a login link",
                    )),
                }
            }
        });
    let index = warp::path::end()
        .and(warp::get())
        .map(|| asset("index.html").expect("index.html"));
    let static_files = warp::path("static")
        .and(warp::path::tail())
        .and(warp::get())
        .and_then(|tail: warp::path::Tail| async move {
            asset(tail.as_str()).ok_or_else(warp::reject::not_found)
        });
    let api = warp::path("api").and(session(&ctx)).and(api::api(&ctx));
    let state = ctx.state.clone();
    host_allowed(std::sync::Arc::new(hosts))
        .and(
            login
                .or(session_info)
                .unify()
                .or(index)
                .unify()
                .or(static_files)
                .unify()
                .or(api)
                .unify(),
        )
        .recover(move |err| api::recover(err, state.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_a_session_has_its_own_csrf() {
        let s = Sessions::default();
        let code = s.new_code();
        let (id, csrf) = s.redeem(&code).unwrap();
        assert!(s.redeem(&code).is_none(), "once");
        assert_eq!(s.csrf_of(&id), Some(csrf.clone()));
        assert!(s.csrf_of(&csrf).is_none());
        assert!(s.redeem("nope").is_none());
        let (id2, csrf2) = s.redeem(&s.new_code()).unwrap();
        assert!(id2 != id && csrf2 != csrf);
    }
}
