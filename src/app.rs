//! Builds the shared state, starts the listeners and the admin API, and drains on shutdown.
//!
//! Neighbours: `cli.rs` calls `Gatehouse::start_with` inside the runtime it built; everything on
//! the request path reaches the running state through `Shared`.

use std::net::SocketAddr;
use std::path::Path;
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
use crate::listener;
use crate::metrics::Metrics;
use crate::upstream::{health, resolve, Pool};

/// State every connection task shares.
pub struct Shared {
    /// The config in force. A request loads it once and keeps that snapshot to its end.
    pub config: ArcSwap<Snapshot>,
    pub pool: Pool,
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
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    connections: TaskTracker,
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Gatehouse {
    /// Loads the config file, binds every listener and the admin API, and starts serving on the
    /// current tokio runtime.
    pub async fn start(config_path: &Path) -> Result<Gatehouse, StartError> {
        let metrics = Arc::new(Metrics::default());
        let snapshot = config::load(config_path, &metrics)?;
        Gatehouse::start_with(snapshot, metrics).await
    }

    /// Starts serving an already compiled config (whose metrics came from `metrics`).
    pub async fn start_with(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
    ) -> Result<Gatehouse, StartError> {
        let access_log =
            AccessLog::start(&snapshot.log, Arc::clone(&metrics)).map_err(StartError::AccessLog)?;
        let mut bound = Vec::with_capacity(snapshot.listeners.len());
        for l in &snapshot.listeners {
            let socket = listener::bind(l.listen).map_err(|error| StartError::Bind {
                what: format!("listener {}", l.name),
                addr: l.listen,
                error,
            })?;
            bound.push((l.name.clone(), l.max_connections, socket));
        }
        let admin_socket = match &snapshot.admin {
            Some(a) => Some(listener::bind(a.listen).map_err(|error| StartError::Bind {
                what: "admin API".into(),
                addr: a.listen,
                error,
            })?),
            None => None,
        };

        let shared = Arc::new(Shared::new(snapshot, Arc::clone(&metrics), access_log));
        let connections = TaskTracker::new();
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();

        let mut listeners = Vec::with_capacity(bound.len());
        for (name, max_connections, socket) in bound {
            let addr = socket.local_addr().unwrap_or_else(|_| unspecified());
            tracing::info!(listener = %name, "listening on {addr}");
            listeners.push((name, addr));
            tokio::spawn(listener::accept_loop(
                socket,
                max_connections,
                Arc::clone(&shared),
                connections.clone(),
            ));
        }
        let admin = match admin_socket {
            Some(socket) => {
                let addr = socket.local_addr().unwrap_or_else(|_| unspecified());
                tracing::info!("admin API listening on {addr}");
                let state = AdminState {
                    shared: Arc::clone(&shared),
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
        spawn_upstream_tasks(&shared, &background, &stop_background).await;
        let reaper_shared = Arc::clone(&shared);
        let stop = stop_background.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => reaper_shared.pool.reap(),
                    _ = stop.cancelled() => break,
                }
            }
        });

        Ok(Gatehouse {
            shared,
            listeners,
            admin,
            connections,
            background,
            stop_background,
        })
    }

    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
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

/// Starts what keeps each upstream's server list current: the DNS resolver for servers given by
/// name (resolved once before this returns, so the first requests find them) and the active
/// health checks.
async fn spawn_upstream_tasks(
    shared: &Arc<Shared>,
    background: &TaskTracker,
    stop: &CancellationToken,
) {
    let snapshot = shared.config.load_full();
    let resolver = Arc::new(resolve::Resolver::new(&snapshot.resolver));
    // All names at once: with DNS down, start waits one timeout, not one per upstream.
    let mut first = tokio::task::JoinSet::new();
    for upstream in snapshot.upstreams.iter().filter(|u| u.needs_resolver()) {
        let (upstream, resolver, registry) = (
            Arc::clone(upstream),
            Arc::clone(&resolver),
            Arc::clone(&shared.metrics),
        );
        first.spawn(async move { resolve::refresh(&upstream, &resolver, &registry).await });
    }
    while first.join_next().await.is_some() {}
    for upstream in &snapshot.upstreams {
        if upstream.needs_resolver() {
            background.spawn(resolve::run(
                Arc::clone(upstream),
                Arc::clone(&resolver),
                Arc::clone(&shared.metrics),
                stop.clone(),
            ));
        }
        if upstream.health_check.is_some() {
            background.spawn(health::run(Arc::clone(upstream), stop.clone()));
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
