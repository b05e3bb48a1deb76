//! Request bodies on a clock: a client that sends a request head and then
//! trickles (or stalls) its body must not hold a connection for ever.
//!
//! Why: the listener times out request *heads*; bodies were never timed
//! out, so 4,200 connections with a stalled body held every connection
//! slot and `/status` answered 503 for as long as they stayed. Here every
//! body must move: at least [`MIN_BYTES`] in each [`WINDOW`] (or be
//! complete), else 408 and the connection closes. And at most
//! [`MAX_BODIES`] bodies are read at once, [`MAX_BODIES_PER_CLIENT`] per
//! client address: a body over either cap is refused at once (503, the
//! connection closed), so stalled bodies cannot pile up to the
//! connection cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::ApiError;

/// Each window of this length must bring [`MIN_BYTES`] of body.
pub const WINDOW: Duration = Duration::from_secs(10);
pub const MIN_BYTES: usize = 1024;
/// Bodies read at once, in all.
pub const MAX_BODIES: usize = 256;
/// Bodies read at once from one client address.
pub const MAX_BODIES_PER_CLIENT: usize = 64;

/// The client's address, put in each request's extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

#[derive(Default)]
struct Gate {
    all: usize,
    by_client: HashMap<Option<IpAddr>, usize>,
}

fn gate() -> &'static Mutex<Gate> {
    static GATE: OnceLock<Mutex<Gate>> = OnceLock::new();
    GATE.get_or_init(Default::default)
}

/// A body being read: its place under the caps, given back when dropped.
pub struct BodyPermit {
    client: Option<IpAddr>,
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        let mut g = gate().lock().expect("body gate");
        g.all -= 1;
        if let Some(n) = g.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                g.by_client.remove(&self.client);
            }
        }
    }
}

fn refuse(status: StatusCode, message: String) -> Rejection {
    warp::reject::custom(ApiError { status, message })
}

/// A place for one more body, or 503 when a cap is reached.
fn admit(client: Option<IpAddr>) -> Result<BodyPermit, Rejection> {
    let mut g = gate().lock().expect("body gate");
    let mine = g.by_client.get(&client).copied().unwrap_or(0);
    if g.all >= MAX_BODIES || mine >= MAX_BODIES_PER_CLIENT {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many request bodies in flight ({} in all, {mine} from this client; limits {MAX_BODIES} and {MAX_BODIES_PER_CLIENT}); retry shortly",
                g.all
            ),
        ));
    }
    g.all += 1;
    *g.by_client.entry(client).or_insert(0) += 1;
    Ok(BodyPermit { client })
}

/// Admission for a body (see the module doc).
pub fn permit() -> impl Filter<Extract = (BodyPermit,), Error = Rejection> + Clone {
    warp::ext::optional::<Peer>()
        .and_then(|peer: Option<Peer>| async move { admit(peer.map(|p| p.0)) })
}

/// The body's clock: the current window and what it brought.
pub struct Clock {
    window_start: Instant,
    in_window: usize,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            window_start: Instant::now(),
            in_window: 0,
        }
    }
}

impl Clock {
    /// The next chunk of `body`, or 408 when a window passes with less than
    /// [`MIN_BYTES`] in it.
    pub async fn next<S, B, E>(&mut self, body: &mut S) -> Result<Option<Result<B, E>>, Rejection>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: Buf,
    {
        loop {
            let deadline = self.window_start + WINDOW;
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(item) => {
                    if let Some(Ok(b)) = &item {
                        self.in_window += b.remaining();
                    }
                    if Instant::now() >= deadline {
                        self.roll()?;
                    }
                    return Ok(item);
                }
                Err(_) => self.roll()?,
            }
        }
    }

    /// A window ended: it must have brought enough.
    fn roll(&mut self) -> Result<(), Rejection> {
        if self.in_window < MIN_BYTES {
            return Err(refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body stalled: {} byte(s) in {} s (at least {MIN_BYTES} bytes every {} s)",
                    self.in_window,
                    WINDOW.as_secs(),
                    WINDOW.as_secs()
                ),
            ));
        }
        self.window_start = Instant::now();
        self.in_window = 0;
        Ok(())
    }
}

/// A whole body of at most `limit` bytes, read on the clock.
pub async fn collect<S, B>(body: S, limit: u64) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let mut body = Box::pin(body);
    let mut clock = Clock::default();
    let mut out = BytesMut::new();
    while let Some(chunk) = clock.next(&mut body).await? {
        let mut chunk = chunk.map_err(|_| {
            super::bad("the request body ended before its Content-Length".to_string())
        })?;
        if out.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large (limit {limit} bytes)"),
            ));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}
