//! Starting and stopping the daemon: data directory, bearer token, store,
//! scheduler, recovery, the HTTP server, graceful shutdown.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::api::{self, Ctx};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::state::State;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub scheduler: SchedulerConfig,
}

pub const TOKEN_FILE: &str = "token";

/// Read the token, creating it (owner-only permissions) on first start.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join(TOKEN_FILE);
    if path.exists() {
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is readable by others (mode {mode:o}); run chmod 600 on it",
                path.display()
            );
        }
        return Ok(std::fs::read_to_string(&path)?.trim().to_string());
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = hex::encode(bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(token)
}

/// A running daemon inside this process.
pub struct Daemon {
    pub addr: SocketAddr,
    pub token: String,
    pub state: Arc<State>,
    pub scheduler: Arc<Scheduler>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    pub async fn start(config: DaemonConfig) -> Result<Daemon> {
        let token = ensure_token(&config.data_dir)?;
        let state = State::open(&config.data_dir)?;
        let scheduler = Scheduler::new(state.clone(), config.scheduler.clone());
        scheduler.recover().await?;
        tokio::spawn(scheduler.clone().run());
        let ctx = Ctx {
            state: state.clone(),
            scheduler: scheduler.clone(),
            token: Arc::new(token.clone()),
        };
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (addr, server) = warp::serve(api::routes(ctx))
            .try_bind_with_graceful_shutdown(config.listen, async move {
                let _ = stop_rx.await;
            })
            .with_context(|| format!("listening on {}", config.listen))?;
        let server = tokio::spawn(server);
        Ok(Daemon {
            addr,
            token,
            state,
            scheduler,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Stop accepting, stop workers (their jobs requeue at next start), flush, return.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.scheduler.shutdown(Duration::from_secs(10)).await;
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        // Every append was flushed before it was acknowledged; nothing is pending.
        Ok(())
    }
}

/// `herdd`: run until SIGTERM or SIGINT.
pub async fn serve(config: DaemonConfig) -> Result<()> {
    let daemon = Daemon::start(config.clone()).await?;
    eprintln!(
        "herdd listening on http://{} (data dir {}, devices {:?}; token in {})",
        daemon.addr,
        config.data_dir.display(),
        daemon.scheduler.devices(),
        config.data_dir.join(TOKEN_FILE).display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("herdd: shutting down");
    daemon.shutdown().await
}
