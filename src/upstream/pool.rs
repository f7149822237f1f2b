//! Idle upstream connections, one pool shared by every runtime thread (as Pingora does, unlike
//! nginx's per-worker pools, which is why nginx reuses fewer connections as workers grow).
//!
//! Keyed by `Server::key` (upstream name + address), which is stable across reloads, so a reload
//! keeps warm connections to servers that remain. Locks are std mutexes held for a push or a pop,
//! never across an await. Newest connections are reused first: they are the least likely to have
//! been closed by the server's own idle timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::config::snapshot::Server;
use crate::stream::UpstreamStream;

#[derive(Debug, Default)]
pub struct Pool {
    servers: RwLock<HashMap<Arc<str>, Arc<ServerIdle>>>,
}

/// One server's idle connections. Snapshots hold an `Arc` of it in `Server::idle`.
#[derive(Default)]
pub struct ServerIdle {
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for ServerIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |l| l.len());
        f.debug_struct("ServerIdle").field("idle", &idle).finish()
    }
}

struct Idle {
    stream: UpstreamStream,
    expires: Instant,
}

impl Pool {
    /// The idle list for `server`, created on first use and cached in the snapshot's `Server`.
    fn server<'s>(&self, server: &'s Server) -> &'s ServerIdle {
        server.idle.get_or_init(|| {
            let found = {
                let servers = self.servers.read().unwrap_or_else(PoisonError::into_inner);
                servers.get(&server.key).cloned()
            };
            found.unwrap_or_else(|| {
                let mut servers = self.servers.write().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(servers.entry(Arc::clone(&server.key)).or_default())
            })
        })
    }

    /// An idle connection to the server, if one is alive and of the kind asked for (`tls`: a
    /// reload may have turned TLS on or off). Connections that expired, were closed by the
    /// server, or have unexpected bytes waiting are discarded on the way.
    pub fn checkout(&self, server: &Server, tls: bool) -> Option<UpstreamStream> {
        let list = self.server(server);
        let now = Instant::now();
        loop {
            let conn = {
                let mut list = list.idle.lock().unwrap_or_else(PoisonError::into_inner);
                list.pop()?
            };
            if conn.expires > now && conn.stream.is_tls() == tls && is_quiet(&conn.stream) {
                return Some(conn.stream);
            }
        }
    }

    /// Returns a connection that finished an exchange cleanly. Over `max_idle`, the oldest idle
    /// connection is closed instead.
    pub fn checkin(
        &self,
        server: &Server,
        stream: UpstreamStream,
        max_idle: usize,
        idle: Duration,
    ) {
        if max_idle == 0 {
            return;
        }
        let list = self.server(server);
        let evicted = {
            let mut list = list.idle.lock().unwrap_or_else(PoisonError::into_inner);
            list.push(Idle {
                stream,
                expires: Instant::now() + idle,
            });
            (list.len() > max_idle).then(|| list.remove(0))
        };
        // Closed outside the lock.
        drop(evicted);
    }

    /// Closes expired connections; run periodically so idle sockets do not linger past their
    /// timeout when no request comes to take them.
    pub fn reap(&self) {
        let now = Instant::now();
        let servers: Vec<Arc<ServerIdle>> = {
            let servers = self.servers.read().unwrap_or_else(PoisonError::into_inner);
            servers.values().cloned().collect()
        };
        for server in servers {
            let expired: Vec<Idle> = {
                let mut list = server.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let (keep, expired) = std::mem::take(&mut *list)
                    .into_iter()
                    .partition(|i| i.expires > now);
                *list = keep;
                expired
            };
            drop(expired);
        }
    }
}

/// True when nothing is waiting on the socket: no FIN, no RST, no stray bytes. A non-blocking
/// peek costs one syscall and catches most connections the server closed while idle; the retry
/// in `proxy.rs` covers the rest (a close racing with our request). Over TLS the peek is at
/// the TCP bytes: a close_notify or anything else unread makes the connection unfit too.
fn is_quiet(stream: &UpstreamStream) -> bool {
    let Some(tcp) = stream.tcp() else {
        return false;
    };
    let mut probe = [0u8; 1];
    match tcp.try_read(&mut probe) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}
