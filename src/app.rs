//! Builds the shared state, starts the listeners (through `reload.rs`, which also swaps in new
//! configs) and the admin API, and drains on shutdown.
//!
//! Neighbours: `cli.rs` calls `Gatehouse::start_from` inside the runtime it built; everything on
//! the request path reaches the running state through `Shared`. A binary upgrade (`handoff.rs`)
//! starts the new process from the old one's sockets (`Inherited`), and ends the old one with
//! `finish_handoff` instead of `shutdown` and `wait`.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::admin::{self, AdminState};
use crate::config::snapshot::Snapshot;
use crate::config::{self, ConfigError};
use crate::handoff::Handover;
use crate::http2::client::H2Pool;
use crate::listener;
use crate::metrics::Metrics;
use crate::reload::{self, FdSlot, InheritedListener, ReloadError, ReloadReport, Reloader};
use crate::upstream::Pool;

/// State every connection task shares.
pub struct Shared {
    /// The config in force. A request loads it once and keeps that snapshot to its end.
    pub config: ArcSwap<Snapshot>,
    pub pool: Pool,
    /// Multiplexed connections to HTTP/2 upstreams, shared the same way.
    pub h2_pool: H2Pool,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// Cancelled when the drain starts: stop accepting, and answer every request from now on
    /// with `Connection: close`.
    pub drain: CancellationToken,
    /// Cancelled when idle keep-alive connections are to be closed: a moment after `drain`
    /// (`IDLE_CLOSE_AFTER`), so that a client sending its next request just then is answered
    /// rather than reset.
    pub close_idle: CancellationToken,
    /// The same fact as `drain`, readable with one atomic load: the request path asks on every
    /// response, and `CancellationToken::is_cancelled` takes a lock.
    draining: AtomicBool,
}

impl Shared {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, access_log: AccessLog) -> Shared {
        Shared {
            config: ArcSwap::from_pointee(snapshot),
            pool: Pool::default(),
            h2_pool: H2Pool::default(),
            metrics,
            access_log,
            drain: CancellationToken::new(),
            close_idle: CancellationToken::new(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts the drain: stop accepting; busy connections close after their current response
    /// (`Connection: close`), idle ones when `close_idle_now` follows.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain.cancel();
    }

    /// The polite first half of a drain after a handoff: every response from now on says
    /// `Connection: close`, but idle keep-alive connections are not closed yet. A client that
    /// sends its next request is answered and told to reconnect (to the new process); only one
    /// that stays idle is closed later, by `close_idle_now`. Closing an idle connection races
    /// with a request the client may be sending at that instant, which it would then see fail.
    pub fn end_keep_alive(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The drain's second half: idle keep-alive connections are closed now.
    pub fn close_idle_now(&self) {
        self.start_drain();
        self.close_idle.cancel();
    }
}

/// How long, after a drain or a handoff begins, keep-alive clients have to send their next
/// request (answered with `Connection: close`) before the connections still idle are closed.
/// Capped by `shutdown_grace`.
pub const IDLE_CLOSE_AFTER: Duration = Duration::from_secs(2);

/// Listening sockets inherited from the process this one takes over from (`handoff.rs`).
#[derive(Debug, Default)]
pub struct Inherited {
    /// Each listener's name and configured address in the old process, and its socket.
    pub listeners: Vec<InheritedListener>,
    /// The admin API's configured address in the old process, and its socket.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {error}")]
    Bind {
        what: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
}

/// A running Gatehouse.
pub struct Gatehouse {
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    admin: Option<SocketAddr>,
    connections: TaskTracker,
    background: TaskTracker,
    stop_background: CancellationToken,
    /// Stops the admin API alone (a handoff), before the background tasks stop.
    admin_stop: CancellationToken,
    /// The admin API's configured address and a copy of its socket, for a handoff.
    admin_fd: Option<(SocketAddr, FdSlot)>,
    /// Cancelled once a new process has taken the sockets over.
    handed_off: CancellationToken,
}

impl Gatehouse {
    /// Loads the config file, binds every listener and the admin API, and starts serving on the
    /// current tokio runtime. The file is read again on every reload.
    pub async fn start(config_path: &Path) -> Result<Gatehouse, StartError> {
        let metrics = Arc::new(Metrics::default());
        let text = std::fs::read_to_string(config_path)
            .map_err(|e| ConfigError::at_start(config_path, format!("cannot read file: {e}")))?;
        let snapshot = config::load_str(config_path, &text, &metrics)?;
        Gatehouse::start_from(
            Some(config_path.to_owned()),
            text.into(),
            snapshot,
            metrics,
            Inherited::default(),
        )
        .await
    }

    /// Starts serving an already compiled config (whose metrics came from `metrics`); such a
    /// process has no file to reload.
    pub async fn start_with(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Gatehouse, StartError> {
        Gatehouse::start_from(None, Arc::from(""), snapshot, metrics, Inherited::default()).await
    }

    /// Starts serving `snapshot`, compiled from `text` read from `path`, on the `inherited`
    /// sockets that its listeners and admin API still want and on new ones for the rest.
    pub async fn start_from(
        path: Option<PathBuf>,
        text: Arc<str>,
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        inherited: Inherited,
    ) -> Result<Gatehouse, StartError> {
        let access_log =
            AccessLog::start(&snapshot.log, Arc::clone(&metrics)).map_err(StartError::AccessLog)?;
        let admin_listen = snapshot.admin.as_ref().map(|a| a.listen);
        // The admin socket comes first: the listeners then start accepting only once nothing
        // else can fail (a takeover that fails must not have taken connections it then drops).
        let admin_socket = match admin_listen {
            Some(addr) => Some((addr, admin_socket(addr, inherited.admin)?)),
            None => {
                if let Some((listen, _)) = inherited.admin {
                    tracing::info!(
                        "the old process's admin API ({listen}) is not in this config: closed"
                    );
                }
                None
            }
        };
        let shared = Arc::new(Shared::new(snapshot, Arc::clone(&metrics), access_log));
        let connections = TaskTracker::new();
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        let watched = path.clone();
        let reloader = Reloader::start(
            path,
            text,
            Arc::clone(&shared),
            connections.clone(),
            background.clone(),
            stop_background.clone(),
            inherited.listeners,
        )
        .await?;
        let admin_stop = stop_background.child_token();
        let (admin, admin_fd) = match admin_socket {
            Some((listen, socket)) => {
                let addr = socket.local_addr().unwrap_or_else(|_| unspecified());
                tracing::info!("admin API listening on {addr}");
                let state = AdminState {
                    shared: Arc::clone(&shared),
                    reloader: Some(Arc::clone(&reloader)),
                };
                let fd: FdSlot = Arc::new(Mutex::new(socket.as_fd().try_clone_to_owned().ok()));
                let slot = Arc::clone(&fd);
                let stop = admin_stop.clone();
                background.spawn(async move {
                    if let Err(e) = admin::serve(socket, state, stop).await {
                        tracing::error!(error = %e, "admin API stopped");
                    }
                    slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                });
                (Some(addr), Some((listen, fd)))
            }
            None => (None, None),
        };
        let reaper_shared = Arc::clone(&shared);
        let stop = stop_background.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        reaper_shared.pool.reap();
                        reaper_shared.h2_pool.reap();
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });

        if let Some(path) = watched {
            background.spawn(crate::watch::run(
                path,
                Arc::clone(&reloader),
                Arc::clone(&shared),
                stop_background.clone(),
            ));
        }

        // The drain's second half, however the drain was started (a signal, `POST /drain`, a
        // failed takeover): idle keep-alive connections are closed a moment after it began.
        let idle_shared = Arc::clone(&shared);
        tokio::spawn(async move {
            idle_shared.drain.cancelled().await;
            let grace = idle_shared.config.load().timeouts.shutdown_grace;
            tokio::time::sleep(grace.min(IDLE_CLOSE_AFTER)).await;
            idle_shared.close_idle_now();
        });

        Ok(Gatehouse {
            shared,
            reloader,
            admin,
            connections,
            background,
            stop_background,
            admin_stop,
            admin_fd,
            handed_off: CancellationToken::new(),
        })
    }

    /// What the handoff server needs to give this process's sockets to a new process.
    pub fn handover(&self) -> Handover {
        Handover::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.reloader),
            self.admin_fd.clone(),
            self.admin_stop.clone(),
            self.handed_off.clone(),
        )
    }

    /// Cancelled once a new process has taken this one's sockets over.
    pub fn handed_off(&self) -> CancellationToken {
        self.handed_off.clone()
    }

    /// Reads the config file again and puts it in force if it is good; see `reload.rs`.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.reloader.reload().await
    }

    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.reloader.listener_addr(name)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Begins a graceful shutdown: stop accepting, close idle connections, let in-flight requests
    /// finish (their responses say `Connection: close`).
    pub fn shutdown(&self) {
        self.shared.start_drain();
    }

    /// Resolves once a shutdown has begun and every connection has finished, or the grace period
    /// has run out.
    pub async fn wait(self) {
        self.shared.drain.cancelled().await;
        let grace = self.shared.config.load().timeouts.shutdown_grace;
        self.finish(grace).await;
    }

    /// Ends the process a new one has taken over from (its accept loops have already stopped):
    /// busy connections finish their request with `Connection: close`; keep-alive clients get
    /// `IDLE_CLOSE_AFTER` to send one more request (answered the same way) before the idle
    /// ones are closed; all within `shutdown_grace`.
    pub async fn finish_handoff(self) {
        let grace = self.shared.config.load().timeouts.shutdown_grace;
        let started = tokio::time::Instant::now();
        self.shared.end_keep_alive();
        self.connections.close();
        let polite = grace.min(IDLE_CLOSE_AFTER);
        let _ = tokio::time::timeout(polite, self.connections.wait()).await;
        self.shared.close_idle_now();
        self.finish(grace.saturating_sub(started.elapsed())).await;
    }

    async fn finish(self, grace: Duration) {
        self.connections.close();
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.connections.len(),
                "shutdown grace period over; closing the remaining connections"
            );
        }
        self.stop_background.cancel();
        self.background.close();
        self.background.wait().await;
    }
}

/// The admin API's socket: the inherited one when it was configured on the same address, else a
/// new one.
fn admin_socket(
    addr: SocketAddr,
    inherited: Option<(SocketAddr, std::net::TcpListener)>,
) -> Result<tokio::net::TcpListener, StartError> {
    let bind_error = |what: &str, error| StartError::Bind {
        what: what.into(),
        addr,
        error,
    };
    match inherited {
        Some((listen, socket)) if listen == addr => {
            tracing::info!("took over the socket of the admin API");
            reload::adopt(socket).map_err(|e| bind_error("admin API (socket taken over)", e))
        }
        other => {
            if let Some((listen, _)) = other {
                tracing::info!("the old process's admin API ({listen}) moved to {addr}: closed");
            }
            listener::bind(addr).map_err(|e| bind_error("admin API", e))
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
