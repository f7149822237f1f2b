//! Builds the shared state, starts the listeners (through `reload.rs`, which also swaps in new
//! configs) and the admin API, and drains on shutdown.
//!
//! Neighbours: `cli.rs` calls `Gatehouse::start_with` inside the runtime it built; everything on
//! the request path reaches the running state through `Shared`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::admin::{self, AdminState};
use crate::config::snapshot::Snapshot;
use crate::config::{self, ConfigError};
use crate::http2::client::H2Pool;
use crate::listener;
use crate::metrics::Metrics;
use crate::reload::{ReloadError, ReloadReport, Reloader};
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
    /// Cancelled when the drain starts: stop accepting, close idle connections, and answer
    /// in-flight requests with `Connection: close`.
    pub drain: CancellationToken,
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
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts the drain: stop accepting, close idle connections, close busy ones after their
    /// current response.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain.cancel();
    }
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
}

impl Gatehouse {
    /// Loads the config file, binds every listener and the admin API, and starts serving on the
    /// current tokio runtime. The file is read again on every reload.
    pub async fn start(config_path: &Path) -> Result<Gatehouse, StartError> {
        let metrics = Arc::new(Metrics::default());
        let text = std::fs::read_to_string(config_path)
            .map_err(|e| ConfigError::at_start(config_path, format!("cannot read file: {e}")))?;
        let snapshot = config::load_str(config_path, &text, &metrics)?;
        Gatehouse::start_from(Some(config_path.to_owned()), text.into(), snapshot, metrics).await
    }

    /// Starts serving an already compiled config (whose metrics came from `metrics`); such a
    /// process has no file to reload.
    pub async fn start_with(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Gatehouse, StartError> {
        Gatehouse::start_from(None, Arc::from(""), snapshot, metrics).await
    }

    /// Starts serving `snapshot`, compiled from `text` read from `path`.
    pub async fn start_from(
        path: Option<PathBuf>,
        text: Arc<str>,
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Gatehouse, StartError> {
        let access_log =
            AccessLog::start(&snapshot.log, Arc::clone(&metrics)).map_err(StartError::AccessLog)?;
        let admin_listen = snapshot.admin.as_ref().map(|a| a.listen);
        let shared = Arc::new(Shared::new(snapshot, Arc::clone(&metrics), access_log));
        let connections = TaskTracker::new();
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        let reloader = Reloader::start(
            path,
            text,
            Arc::clone(&shared),
            connections.clone(),
            background.clone(),
            stop_background.clone(),
        )
        .await?;
        let admin_socket = match admin_listen {
            Some(addr) => match listener::bind(addr) {
                Ok(socket) => Some(socket),
                Err(error) => {
                    // The listeners are already accepting: close them again.
                    shared.start_drain();
                    stop_background.cancel();
                    return Err(StartError::Bind {
                        what: "admin API".into(),
                        addr,
                        error,
                    });
                }
            },
            None => None,
        };
        let admin = match admin_socket {
            Some(socket) => {
                let addr = socket.local_addr().unwrap_or_else(|_| unspecified());
                tracing::info!("admin API listening on {addr}");
                let state = AdminState {
                    shared: Arc::clone(&shared),
                    reloader: Some(Arc::clone(&reloader)),
                };
                let stop = stop_background.clone();
                background.spawn(async move {
                    if let Err(e) = admin::serve(socket, state, stop).await {
                        tracing::error!(error = %e, "admin API stopped");
                    }
                });
                Some(addr)
            }
            None => None,
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

        Ok(Gatehouse {
            shared,
            reloader,
            admin,
            connections,
            background,
            stop_background,
        })
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
        self.connections.close();
        let grace = self.shared.config.load().timeouts.shutdown_grace;
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

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
