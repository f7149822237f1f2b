//! Applying a config to the running process: at start, and again on every reload (SIGHUP,
//! `POST /reload`), without dropping a request.
//!
//! Neighbours: `app.rs` creates the `Reloader` and applies the first snapshot through it;
//! `cli.rs` calls `reload` on SIGHUP and `admin.rs` on `POST /reload`; `listener.rs` runs one
//! accept loop per listener, each with its own stop token so that one can be closed alone.
//!
//! A reload is all or nothing: the file is read, compiled and checked, and every new listener
//! bound, before anything changes. If any of that fails, the old config keeps serving and the
//! error (with `file:line:col`) is returned, logged and counted. If it all works, the new
//! snapshot is swapped in with one atomic store: requests in flight finish on the snapshot they
//! loaded, keep-alive connections take the new one at their next request. Then removed listeners
//! stop accepting (their connections finish), and the health-check and DNS tasks of the old
//! snapshot are stopped and the new one's started. Idle upstream connections and each server's
//! state are kept by server key, so servers that remain stay warm and keep their health.
//!
//! A binary upgrade (`handoff.rs`) starts the new process from the listening sockets of the old
//! one: `start` adopts each inherited socket whose listener the new config still has, and a later
//! reload treats it like any other. In the old process, `offer` lends out the sockets (reloads
//! wait meanwhile) and `OfferedSockets::commit` stops its accept loops for good.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{Shared, StartError};
use crate::config::snapshot::{ResolverSettings, Snapshot};
use crate::config::{self, ConfigError};
use crate::listener;
use crate::upstream::{health, resolve};

/// Serves one config file's listeners and background tasks, and swaps in new versions of it.
pub struct Reloader {
    /// `None` when started from an already compiled snapshot: such a process cannot reload.
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    connections: TaskTracker,
    background: TaskTracker,
    stop_background: CancellationToken,
    /// Held for a whole reload, so that two never interleave.
    applying: tokio::sync::Mutex<Tasks>,
    listeners: Mutex<Vec<Running>>,
    status: Mutex<Status>,
    /// Set once a new process took the listeners over: nothing may bind or reload any more.
    handed_off: AtomicBool,
    /// Set while a new process is taking the listeners over: reloads are refused meanwhile.
    offering: AtomicBool,
}

/// A copy of a listening socket's descriptor, for a binary upgrade to hand over; emptied when
/// the accept loop ends, so that a closed listener really closes (connections are refused, not
/// queued on a socket that no one accepts from).
pub(crate) type FdSlot = Arc<Mutex<Option<OwnedFd>>>;

/// A listening socket inherited from the process this one took over from: the listener's name
/// and configured address there, and the socket.
pub type InheritedListener = (String, SocketAddr, std::net::TcpListener);

/// The background tasks of the snapshot in force.
struct Tasks {
    /// Cancelled when the next snapshot's tasks replace these.
    generation: CancellationToken,
    resolver: Arc<resolve::Resolver>,
    resolver_settings: ResolverSettings,
}

/// One listener's accept loop.
struct Running {
    name: String,
    /// As configured (port 0 stays 0, so a reload does not rebind it).
    listen: SocketAddr,
    /// As bound.
    local: SocketAddr,
    permits: Arc<Semaphore>,
    cap: usize,
    stop: CancellationToken,
    fd: FdSlot,
}

/// What `GET /config` and the metrics report.
#[derive(Debug, Clone)]
pub struct Status {
    pub path: Option<PathBuf>,
    /// 1 for the config loaded at start, one more for each successful reload.
    pub generation: u64,
    pub loaded_at: SystemTime,
    /// The text of the config in force, as read from the file.
    pub text: Arc<str>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The last reload that failed, when it came after the last one that worked.
    pub last_error: Option<(SystemTime, String)>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} (listener {name}): {error}")]
    Bind {
        name: String,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("this process was started without a config file, so it cannot reload")]
    NoFile,
    #[error("this process handed its listeners to a new process and is draining: reload that one")]
    HandedOff,
    #[error("a new process is taking the listeners over; reload it once it has")]
    HandoffInProgress,
}

/// What a successful reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    pub generation: u64,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    /// Settings that changed in the file but only take effect at a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Reloader {
    /// Starts serving `snapshot`: binds every listener (all or nothing) and starts the
    /// upstreams' background tasks. A listener found in `inherited` (same name and configured
    /// address; failing that, the same configured address under another name) keeps that socket
    /// instead of binding a new one; inherited sockets no listener wants are closed.
    pub(crate) async fn start(
        path: Option<PathBuf>,
        text: Arc<str>,
        shared: Arc<Shared>,
        connections: TaskTracker,
        background: TaskTracker,
        stop_background: CancellationToken,
        mut inherited: Vec<InheritedListener>,
    ) -> Result<Arc<Reloader>, StartError> {
        let snapshot = shared.config.load_full();
        let mut bound = Vec::with_capacity(snapshot.listeners.len());
        for l in &snapshot.listeners {
            let socket = match take_inherited(&mut inherited, &l.name, l.listen) {
                Some((from, socket)) => {
                    let socket = adopt(socket).map_err(|error| StartError::Bind {
                        what: format!("listener {} (socket taken over from {from})", l.name),
                        addr: l.listen,
                        error,
                    })?;
                    tracing::info!(listener = %l.name, "took over the socket of listener {from}");
                    socket
                }
                None => listener::bind(l.listen).map_err(|error| StartError::Bind {
                    what: format!("listener {}", l.name),
                    addr: l.listen,
                    error,
                })?,
            };
            bound.push((l.name.clone(), l.listen, l.max_connections, socket));
        }
        for (name, listen, _) in inherited {
            tracing::info!(
                "listener {name} ({listen}) of the old process is not in this config: closed"
            );
        }
        let resolver = Arc::new(resolve::Resolver::new(&snapshot.resolver));
        let generation = stop_background.child_token();
        let reloader = Arc::new(Reloader {
            status: Mutex::new(Status {
                path: path.clone(),
                generation: 1,
                loaded_at: SystemTime::now(),
                text,
                reloads_ok: 0,
                reloads_failed: 0,
                last_error: None,
            }),
            path,
            shared,
            connections,
            background,
            applying: tokio::sync::Mutex::new(Tasks {
                generation: generation.clone(),
                resolver: Arc::clone(&resolver),
                resolver_settings: snapshot.resolver.clone(),
            }),
            stop_background,
            listeners: Mutex::new(Vec::new()),
            handed_off: AtomicBool::new(false),
            offering: AtomicBool::new(false),
        });
        for (name, listen, cap, socket) in bound {
            reloader.run_listener(name, listen, cap, socket);
        }
        resolve_names(&snapshot, &resolver, &reloader.shared).await;
        reloader.spawn_tasks(&snapshot, &resolver, &generation);
        Ok(reloader)
    }

    /// Reads the file again and, if it is good, puts it in force. Serialised with other reloads.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let outcome = self.apply().await;
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        match &outcome {
            Ok((report, text)) => {
                status.generation = report.generation;
                status.loaded_at = SystemTime::now();
                status.text = Arc::clone(text);
                status.reloads_ok += 1;
                status.last_error = None;
                tracing::info!(
                    generation = report.generation,
                    added = ?report.listeners_added,
                    removed = ?report.listeners_removed,
                    "config reloaded"
                );
                for setting in &report.needs_restart {
                    tracing::warn!("{setting} changed in the file; it takes effect at a restart");
                }
            }
            Err(e) => {
                status.reloads_failed += 1;
                status.last_error = Some((SystemTime::now(), e.to_string()));
                tracing::error!("config reload failed; the previous config stays in force:\n{e}");
            }
        }
        outcome.map(|(report, _)| report)
    }

    async fn apply(&self) -> Result<(ReloadReport, Arc<str>), ReloadError> {
        let path = self.path.as_deref().ok_or(ReloadError::NoFile)?;
        if self.offering.load(Ordering::SeqCst) {
            return Err(ReloadError::HandoffInProgress);
        }
        let mut tasks = self.applying.lock().await;
        if self.handed_off.load(Ordering::SeqCst) {
            return Err(ReloadError::HandedOff);
        }
        let text: Arc<str> = read(path)?.into();
        let snapshot = config::load_str(path, &text, &self.shared.metrics)?;
        let old = self.shared.config.load_full();
        let mut report = ReloadReport {
            needs_restart: needs_restart(&old, &snapshot),
            ..ReloadReport::default()
        };

        // Everything that can fail happens before anything changes.
        let mut fresh = Vec::new();
        {
            let running = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for l in &snapshot.listeners {
                let kept = running
                    .iter()
                    .any(|r| r.name == l.name && r.listen == l.listen);
                if kept {
                    continue;
                }
                // An address that a listener being removed holds now is taken over only after
                // it closed; SO_REUSEADDR lets the new bind through then.
                let held = running.iter().any(|r| r.local == l.listen);
                fresh.push((l.name.clone(), l.listen, l.max_connections, held));
            }
        }
        let mut bound = Vec::new();
        for (name, listen, cap, held) in &fresh {
            if *held {
                continue;
            }
            let socket = listener::bind(*listen).map_err(|error| ReloadError::Bind {
                name: name.clone(),
                addr: *listen,
                error,
            })?;
            bound.push((name.clone(), *listen, *cap, socket));
        }
        let resolver = if snapshot.resolver == tasks.resolver_settings {
            Arc::clone(&tasks.resolver)
        } else {
            Arc::new(resolve::Resolver::new(&snapshot.resolver))
        };
        // Names are resolved before the swap, so the new snapshot's upstreams are not empty.
        resolve_names(&snapshot, &resolver, &self.shared).await;

        let snapshot = Arc::new(snapshot);
        self.shared.config.store(Arc::clone(&snapshot));

        // Listeners that are gone or moved stop accepting; their connections finish.
        {
            let mut running = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            running.retain(|r| {
                let keep = snapshot
                    .listeners
                    .iter()
                    .find(|l| l.name == r.name && l.listen == r.listen);
                match keep {
                    Some(l) => {
                        adjust_cap(r, l.max_connections);
                        true
                    }
                    None => {
                        r.stop.cancel();
                        report.listeners_removed.push(r.name.clone());
                        false
                    }
                }
            });
            for r in running.iter_mut() {
                if let Some(l) = snapshot.listeners.iter().find(|l| l.name == r.name) {
                    r.cap = l.max_connections;
                }
            }
        }
        for (name, listen, cap, socket) in bound {
            report.listeners_added.push(name.clone());
            self.run_listener(name, listen, cap, socket);
        }
        for (name, listen, cap, held) in fresh {
            if held {
                let socket = bind_when_free(listen)
                    .await
                    .map_err(|error| ReloadError::Bind {
                        name: name.clone(),
                        addr: listen,
                        error,
                    })?;
                report.listeners_added.push(name.clone());
                self.run_listener(name, listen, cap, socket);
            }
        }

        tasks.generation.cancel();
        tasks.generation = self.stop_background.child_token();
        tasks.resolver = Arc::clone(&resolver);
        tasks.resolver_settings = snapshot.resolver.clone();
        self.spawn_tasks(&snapshot, &resolver, &tasks.generation);

        let generation = {
            let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.generation + 1
        };
        report.generation = generation;
        Ok((report, text))
    }

    fn run_listener(
        &self,
        name: String,
        listen: SocketAddr,
        cap: usize,
        socket: tokio::net::TcpListener,
    ) {
        let local = socket.local_addr().unwrap_or(listen);
        tracing::info!(listener = %name, "listening on {local}");
        let permits = Arc::new(Semaphore::new(cap.max(1)));
        let stop = self.shared.drain.child_token();
        let fd: FdSlot = Arc::new(Mutex::new(socket.as_fd().try_clone_to_owned().ok()));
        let accept = listener::accept_loop(
            socket,
            name.as_str().into(),
            Arc::clone(&permits),
            stop.clone(),
            Arc::clone(&self.shared),
            self.connections.clone(),
        );
        let slot = Arc::clone(&fd);
        tokio::spawn(async move {
            accept.await;
            slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        });
        let mut running = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        running.push(Running {
            name,
            listen,
            local,
            permits,
            cap,
            stop,
            fd,
        });
    }

    /// Lends the listening sockets to a new process: reloads wait until the returned value is
    /// committed or dropped, so the set handed over is the set in force.
    pub(crate) async fn offer(&self) -> Result<OfferedSockets<'_>, ReloadError> {
        let guard = self.applying.lock().await;
        if self.handed_off.load(Ordering::SeqCst) {
            return Err(ReloadError::HandedOff);
        }
        self.offering.store(true, Ordering::SeqCst);
        let running = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut sockets = Vec::with_capacity(running.len());
        for r in running.iter() {
            let fd = r.fd.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(fd) = fd.as_ref().and_then(|fd| fd.try_clone().ok()) else {
                // Stopping (removed by a reload a moment ago), or out of descriptors.
                continue;
            };
            sockets.push(OfferedListener {
                name: r.name.clone(),
                listen: r.listen,
                local: r.local,
                fd,
            });
        }
        Ok(OfferedSockets {
            reloader: self,
            sockets,
            _reloads: guard,
        })
    }

    fn spawn_tasks(
        &self,
        snapshot: &Snapshot,
        resolver: &Arc<resolve::Resolver>,
        generation: &CancellationToken,
    ) {
        for upstream in &snapshot.upstreams {
            if upstream.needs_resolver() {
                self.background.spawn(resolve::run(
                    Arc::clone(upstream),
                    Arc::clone(resolver),
                    Arc::clone(&self.shared.metrics),
                    generation.clone(),
                ));
            }
            if upstream.health_check.is_some() {
                self.background
                    .spawn(health::run(Arc::clone(upstream), generation.clone()));
            }
        }
    }

    /// The bound address of the listener `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let running = self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        running.iter().find(|r| r.name == name).map(|r| r.local)
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One listener's socket, lent out for a handoff.
pub(crate) struct OfferedListener {
    pub name: String,
    pub listen: SocketAddr,
    pub local: SocketAddr,
    pub fd: OwnedFd,
}

/// The listening sockets while a new process takes them over; reloads wait meanwhile.
pub(crate) struct OfferedSockets<'r> {
    reloader: &'r Reloader,
    pub sockets: Vec<OfferedListener>,
    _reloads: tokio::sync::MutexGuard<'r, Tasks>,
}

impl OfferedSockets<'_> {
    /// The new process serves now: stop accepting here, for good. The sockets stay open in the
    /// new process, so connections waiting in their accept queues are accepted there.
    pub fn commit(self) {
        self.reloader.handed_off.store(true, Ordering::SeqCst);
        let running = self
            .reloader
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for r in running.iter() {
            r.stop.cancel();
        }
    }
}

impl Drop for OfferedSockets<'_> {
    fn drop(&mut self) {
        self.reloader.offering.store(false, Ordering::SeqCst);
    }
}

/// The inherited socket for listener `name` on `listen`: same name and address first, else the
/// same configured address under another name (a renamed listener keeps its socket rather than
/// failing to bind an address the inherited socket holds). With the name it had.
fn take_inherited(
    inherited: &mut Vec<InheritedListener>,
    name: &str,
    listen: SocketAddr,
) -> Option<(String, std::net::TcpListener)> {
    let at = inherited
        .iter()
        .position(|(n, l, _)| n == name && *l == listen)
        .or_else(|| inherited.iter().position(|(_, l, _)| *l == listen))?;
    let (from, _, socket) = inherited.swap_remove(at);
    Some((from, socket))
}

/// An inherited descriptor becomes a tokio listener, once it is known to be a listening socket.
pub(crate) fn adopt(socket: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    let sock = socket2::SockRef::from(&socket);
    // An IP socket, not a Unix one that would fail at every accept.
    if !matches!(
        sock.domain()?,
        socket2::Domain::IPV4 | socket2::Domain::IPV6
    ) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the inherited descriptor is not a TCP socket",
        ));
    }
    if !sock.is_listener()? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the inherited descriptor is not a listening socket",
        ));
    }
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::at_start(path, format!("cannot read file: {e}")))
}

/// Resolves every upstream's names once, all at once: with DNS down, this waits one resolver
/// timeout, not one per upstream.
async fn resolve_names(snapshot: &Snapshot, resolver: &Arc<resolve::Resolver>, shared: &Shared) {
    let mut first = tokio::task::JoinSet::new();
    for upstream in snapshot.upstreams.iter().filter(|u| u.needs_resolver()) {
        let (upstream, resolver, registry) = (
            Arc::clone(upstream),
            Arc::clone(resolver),
            Arc::clone(&shared.metrics),
        );
        first.spawn(async move { resolve::refresh(&upstream, &resolver, &registry).await });
    }
    while first.join_next().await.is_some() {}
}

/// A listener's connection cap moves with the config: permits are added, or taken out of
/// circulation as connections end.
fn adjust_cap(r: &Running, cap: usize) {
    let cap = cap.max(1);
    let old = r.cap.max(1);
    if cap > old {
        r.permits.add_permits(cap - old);
    } else if cap < old {
        let permits = Arc::clone(&r.permits);
        let fewer = u32::try_from(old - cap).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            if let Ok(p) = permits.acquire_many_owned(fewer).await {
                p.forget();
            }
        });
    }
}

/// Binds an address that a listener stopped a moment ago holds until its accept loop ends.
async fn bind_when_free(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..100 {
        match listener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("address stayed in use")))
}

/// Settings the running process cannot change in place.
fn needs_restart(old: &Snapshot, new: &Snapshot) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.workers != new.workers {
        out.push("workers");
    }
    if old.log != new.log {
        out.push("[log]");
    }
    if old.admin != new.admin {
        out.push("[admin]");
    }
    out
}
