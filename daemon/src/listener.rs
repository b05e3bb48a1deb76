//! Accepting connections so that slow or broken clients can't lock anyone out.
//!
//! `warp::serve` accepts without bound and waits for a request head for
//! ever: a thousand idle, half-sent connections (no token needed) used to
//! exhaust the process's file descriptors and make every client time out.
//! Here each connection must finish its request head within
//! [`HEADER_TIMEOUT`], at most [`max_connections`] are served at once, and a
//! connection over the limit gets an immediate JSON 503 instead of a hang.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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
    let service = warp::service(routes);
    let mut http = hyper::server::conn::Http::new();
    http.http1_only(true)
        .http1_header_read_timeout(HEADER_TIMEOUT);
    let http = Arc::new(http);
    tokio::pin!(stop);
    loop {
        let (mut stream, _peer) = tokio::select! {
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
        let service = service.clone();
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
            let _ = http.serve_connection(stream, service).await;
        });
    }
}

/// Bind `addr` (port 0 picks a free one); returns the bound address too.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
