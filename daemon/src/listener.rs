//! Accepting connections so that slow or broken clients can't lock anyone out.
//!
//! `warp::serve` accepts without bound and waits for a request head for
//! ever: a thousand idle, half-sent connections (no token needed) used to
//! exhaust the process's file descriptors and make every client time out.
//! Here each connection must finish its request head within
//! [`HEADER_TIMEOUT`], at most [`max_connections`] are served at once, and a
//! connection over the limit gets an immediate JSON 503 instead of a hang.
//! Requests hyper cannot even parse (a bad request line or Content-Length,
//! headers too large) get the API's JSON error body too ([`JsonParseErrors`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use warp::{Filter, Reply};

/// Time a client has to send a whole request head, from connecting (and
/// between requests on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once: 4096, or half the descriptors the process
/// may open (after raising its soft limit to the hard one), whichever is less.
pub fn max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            if lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
            return ((lim.rlim_cur / 2) as usize).clamp(16, 4096);
        }
    }
    512
}

/// Serve `routes` on `listener` until `stop` fires.
pub async fn serve<F>(listener: TcpListener, routes: F, stop: oneshot::Receiver<()>)
where
    F: Filter<Error = Infallible> + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let limit = max_connections();
    let slots = Arc::new(Semaphore::new(limit));
    let routes = warp::service(routes);
    let mut http = hyper::server::conn::Http::new();
    http.http1_only(true)
        .http1_header_read_timeout(HEADER_TIMEOUT);
    let http = Arc::new(http);
    tokio::pin!(stop);
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                // Out of descriptors or a connection reset before accept:
                // wait a moment instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let body = format!(
                    "{{\"error\":\"too many open connections (limit {limit}); retry shortly\"}}"
                );
                let reply = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
                    body.len()
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(reply.as_bytes()),
                )
                .await;
            });
            continue;
        };
        let routes = routes.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            // A connection that never sends a byte is timed out here; hyper
            // times out a head that started but never finished.
            let mut first = [0u8; 1];
            match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            // A handler that panics answers 500 with the reason, instead of
            // the connection dropping with no answer (the client would ask
            // "is the daemon running?"). A panicking request records nothing.
            let service =
                hyper::service::service_fn(move |mut req: hyper::Request<hyper::Body>| {
                    // Who sent it: request bodies are capped per client.
                    req.extensions_mut()
                        .insert(crate::api::bodies::Peer(peer.ip()));
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let mut routes = routes.clone();
                    async move {
                        use futures_util::FutureExt;
                        use hyper::service::Service;
                        match std::panic::AssertUnwindSafe(routes.call(req))
                            .catch_unwind()
                            .await
                        {
                            Ok(answer) => answer,
                            Err(panic) => Ok(panicked(&method, &path, panic)),
                        }
                    }
                });
            let _ = http
                .serve_connection(JsonParseErrors::new(stream), service)
                .await;
        });
    }
}

/// The 500 answer to a request whose handler panicked.
fn panicked(
    method: &hyper::Method,
    path: &str,
    panic: Box<dyn std::any::Any + Send>,
) -> hyper::Response<hyper::Body> {
    let reason = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    tracing::error!("{method} {path}: handler panicked: {reason}");
    let body = serde_json::json!({
        "error": format!("internal error answering {method} {path}: {reason} (a bug in herdd; nothing was recorded by this request)")
    });
    let mut r = hyper::Response::new(hyper::Body::from(body.to_string()));
    *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Bind `addr` (port 0 picks a free one); returns the bound address too.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// hyper answers a request it cannot parse with a canned status and an empty
/// body, before any route runs. This wrapper around the connection rewrites
/// exactly those answers (a 400, 414 or 431 head with `content-length: 0`:
/// every response of the API itself carries a JSON body) into the API's
/// `{"error": ...}` form, so a malformed request is never answered blank.
pub struct JsonParseErrors<T> {
    inner: T,
    /// A rewritten answer still to be written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<T> JsonParseErrors<T> {
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The JSON answer for one of hyper's canned parse-error heads, if `buf` is one.
fn json_for_canned(buf: &[u8]) -> Option<Vec<u8>> {
    let (status, message) = [
        (
            "400 Bad Request",
            "malformed request: its request line, a header or its Content-Length could not be parsed",
        ),
        ("414 URI Too Long", "request URI too long"),
        (
            "431 Request Header Fields Too Large",
            "request headers too large",
        ),
    ]
    .into_iter()
    .find(|(status, _)| {
        buf.strip_prefix(b"HTTP/1.1 ")
            .is_some_and(|rest| rest.starts_with(status.as_bytes()))
    })?;
    let head = std::str::from_utf8(buf).ok()?;
    let blank_body = head.ends_with("\r\n\r\n")
        && head
            .to_ascii_lowercase()
            .contains("\r\ncontent-length: 0\r\n");
    if !blank_body {
        return None;
    }
    let body = format!("{{\"error\":{}}}", serde_json::to_string(message).ok()?);
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> JsonParseErrors<T> {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.written < self.pending.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if let Some(answer) = json_for_canned(buf) {
            self.pending = answer;
            self.written = 0;
            // Accepted: the rewritten bytes go out in drain (here or on flush).
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// Vectored writes pass through (a canned answer is a head alone, so it
    /// arrives as one slice and is caught here as in `poll_write`): large
    /// bodies are not copied into one buffer to watch for a rare error.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (slices.next(), slices.next()) {
            if json_for_canned(only).is_some() {
                return self.poll_write(cx, only);
            }
        }
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::json_for_canned;

    #[test]
    fn only_blank_canned_error_heads_are_rewritten() {
        let canned = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sat, 28 Nov 2026 10:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_for_canned(canned).unwrap()).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("}") && answer.contains("{\"error\":"),
            "{answer}"
        );
        // The API's own 400s carry a body and pass untouched.
        let api = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"error\":1}";
        assert!(json_for_canned(api).is_none());
        assert!(json_for_canned(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }

    /// A handler that panics is answered 500 with the reason, and the
    /// connection (and the daemon) live on.
    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        use super::*;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let routes = warp::path("boom")
            .map(|| -> String { panic!("the sort has no total order") })
            .or(warp::path("fine").map(|| "fine".to_string()))
            .unify()
            .recover(|_| async { Ok::<_, Infallible>("no route".to_string()) })
            .unify();
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (_stop, stop_rx) = oneshot::channel();
        tokio::spawn(serve(listener, routes, stop_rx));
        let ask = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET /{path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let answer = ask("boom").await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains("the sort has no total order"), "{answer}");
        assert!(answer.contains("application/json"), "{answer}");
        assert!(ask("fine").await.ends_with("fine"));
    }
}
