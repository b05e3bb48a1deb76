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
    /// Where to serve the web dashboard (None: not served).
    pub dashboard: Option<SocketAddr>,
    /// Further names the dashboard answers to (`Host`), beside its own
    /// address (and `localhost` when that is a loopback address): a
    /// reverse proxy's name, say. Any other `Host` gets 421.
    pub dashboard_hosts: Vec<String>,
}

pub const TOKEN_FILE: &str = "token";
/// Where herdd says which address it listens on (`http://HOST:PORT`), so a
/// client given only the data directory finds a daemon on any port. Its own
/// file, not a line in the token file: scripts read the token file whole
/// (`Authorization: Bearer $(cat DATA/token)`), and the address is no secret.
pub const ADDRESS_FILE: &str = "address";
/// Tokens shorter than this are refused: a guessable token is no token.
pub const MIN_TOKEN_LEN: usize = 32;

/// Make the data directory owner-only and have everything herdd creates
/// in it owner-only too (the log, blobs and checkpoints are the user's data).
pub fn secure_data_dir(data_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask only sets the process's file-mode mask.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let mode = std::fs::metadata(data_dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} owner-only (chmod 700)", data_dir.display()))?;
        eprintln!(
            "herdd: {} was mode {mode:o}; made it owner-only (700)",
            data_dir.display()
        );
    }
    Ok(())
}

/// Hold DATA/herdd.lock (an advisory lock the kernel drops when the process
/// dies, however it dies) for as long as the returned file lives, so a
/// second herdd, or `herdd repair`, on the same directory says who holds it.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::AsRawFd;
    let path = data_dir.join("herdd.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        anyhow::bail!(
            "another herdd (pid {}) holds {}; stop it first",
            if holder.is_empty() { "unknown" } else { holder },
            data_dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(file)
}

/// Read the bearer token, creating it on first start. A token herdd did not
/// make properly (empty, short, whitespace, readable by others) is refused:
/// an empty token file used to switch auth off.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read(&path) {
        // An empty file is what an interrupted first start of an older herdd
        // left (it wrote the token in place): replace it with a real one.
        Ok(bytes) if bytes.is_empty() => {
            eprintln!("herdd: {} is empty; writing a new token", path.display());
            write_new_token(data_dir)
        }
        Ok(bytes) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "{} is readable by others (mode {mode:o}); run `chmod 600 {}` or delete it to get a new token",
                    path.display(),
                    path.display()
                );
            }
            let token = String::from_utf8(bytes)
                .ok()
                .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
                .filter(|t| t.len() >= MIN_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic()));
            token.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} does not hold a usable token (at least {MIN_TOKEN_LEN} printable characters, no spaces); \
                     delete it and herdd writes a new one",
                    path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_new_token(data_dir),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Record the API's address in `DATA/address` (replaced whole). A daemon
/// listening on every interface is reached locally at the loopback address.
fn write_address(data_dir: &Path, addr: SocketAddr) -> Result<()> {
    let reach = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let path = data_dir.join(ADDRESS_FILE);
    let tmp = data_dir.join(format!(".{ADDRESS_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("http://{reach}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// 256 random bits, hex: written to a temp file, synced, renamed into place,
/// so the token file is either absent or whole.
fn write_new_token(data_dir: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = hex::encode(bytes);
    let path = data_dir.join(TOKEN_FILE);
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing a new token to {}", path.display()));
    }
    Ok(token)
}

/// A running daemon inside this process.
pub struct Daemon {
    pub addr: SocketAddr,
    pub token: String,
    pub state: Arc<State>,
    pub scheduler: Arc<Scheduler>,
    /// Where the dashboard is served, when it is.
    pub dashboard: Option<SocketAddr>,
    /// The data directory's lock, released when the daemon is dropped.
    _lock: std::fs::File,
    stop: Vec<oneshot::Sender<()>>,
    server: Vec<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    pub async fn start(mut config: DaemonConfig) -> Result<Daemon> {
        // Absolute from here on: the blob links import makes and the job
        // files workers read must not depend on the working directory.
        config.data_dir = std::path::absolute(&config.data_dir)
            .with_context(|| format!("data directory {}", config.data_dir.display()))?;
        secure_data_dir(&config.data_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let token = ensure_token(&config.data_dir)?;
        // A repair that died before recording its loss: record it first.
        let data_dir = config.data_dir.clone();
        let recorded =
            tokio::task::spawn_blocking(move || crate::repair::record_pending(&data_dir)).await??;
        for r in recorded {
            eprintln!(
                "herdd: recorded an earlier repair's loss as event {} ({} job(s) marked interrupted)",
                r.seq,
                r.interrupted_jobs.len()
            );
        }
        let state = State::open(&config.data_dir)?;
        let recovery = state.store.log.recovery();
        if recovery.reindexed > 0 || recovery.torn_bytes_cut > 0 {
            eprintln!(
                "herdd: recovered the event log: re-indexed {} record(s) written after the index's last save; \
                 cut {} byte(s) of a torn last line (never acknowledged)",
                recovery.reindexed, recovery.torn_bytes_cut
            );
        }
        if let Some(found) = config.scheduler.executor.probe(&config.data_dir).await? {
            eprintln!("herdd: {found}");
        }
        let scheduler = Scheduler::new(state.clone(), config.scheduler.clone());
        scheduler.recover().await?;
        tokio::spawn(scheduler.clone().run());
        // The dashboard's port is bound first: the API's context says where it is.
        let dashboard = match config.dashboard {
            Some(addr) => match crate::listener::bind(addr).await {
                Ok(bound) => Some(bound),
                Err(e) => {
                    // The API matters more than the dashboard: serve it anyway.
                    eprintln!(
                        "herdd: WARNING: the dashboard is not served: listening on {addr}: {e}"
                    );
                    None
                }
            },
            None => None,
        };
        let ctx = Ctx {
            state: state.clone(),
            scheduler: scheduler.clone(),
            token: Arc::new(token.clone()),
            sessions: Arc::new(crate::dashboard::Sessions::default()),
            dashboard_url: dashboard
                .as_ref()
                .map(|(_, addr)| Arc::new(format!("http://{addr}"))),
        };
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (listener, addr) = crate::listener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        write_address(&config.data_dir, addr)?;
        let mut stops = vec![stop];
        let mut servers = vec![tokio::spawn(crate::listener::serve(
            listener,
            api::routes(ctx.clone()),
            stop_rx,
        ))];
        let dashboard_addr = dashboard.as_ref().map(|(_, a)| *a);
        if let Some((listener, addr)) = dashboard {
            let hosts = crate::dashboard::allowed_hosts(addr, &config.dashboard_hosts);
            let (stop, stop_rx) = oneshot::channel::<()>();
            stops.push(stop);
            servers.push(tokio::spawn(crate::listener::serve(
                listener,
                crate::dashboard::routes(ctx, hosts),
                stop_rx,
            )));
        }
        Ok(Daemon {
            addr,
            token,
            state,
            scheduler,
            dashboard: dashboard_addr,
            _lock: lock,
            stop: stops,
            server: servers,
        })
    }

    /// Stop accepting, stop workers (their jobs requeue at next start), flush, return.
    pub async fn shutdown(mut self) -> Result<()> {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
        self.scheduler.shutdown(Duration::from_secs(10)).await;
        for h in self.server.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        // Every append was flushed before it was acknowledged; the views are
        // derived, saved here so that the next start folds nothing.
        self.state.checkpoint().await?;
        self.state.views.flush()?;
        Ok(())
    }
}

/// Cap glibc's malloc arenas at two (before the runtime starts its threads).
/// By default each thread may get its own arena, and memory freed after a
/// large answer (a page of 1,000 jobs) stays in whichever arena served it:
/// measured on 100k jobs, the daemon kept 294 MiB resident after paging
/// through them all, 276 MiB with two arenas (BENCHMARKS.md).
pub fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called at start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// `herdd`: run until SIGTERM or SIGINT.
pub async fn serve(config: DaemonConfig) -> Result<()> {
    let daemon = Daemon::start(config.clone()).await?;
    if let Some(d) = daemon.dashboard {
        eprintln!("herdd dashboard on http://{d} (log in with `herd dashboard`)");
    }
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
