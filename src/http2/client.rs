//! Connections to HTTP/2 upstreams: multiplexed, and shared by every runtime thread.
//!
//! Neighbours: `proxy::h2` leases a connection here for each request to an upstream with
//! `protocol = "h2c"`; `upstream::targets::Server` caches its list, keyed by the server's
//! stable key, so a reload keeps the connections warm as `upstream::pool` does for HTTP/1.1.
//!
//! One connection per server carries every request, as many at once as the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS allows; a second one is opened only when the first is full.
//! A connection that ended, or that the server sent GOAWAY on, is dropped from the list and
//! the next request opens a fresh one. Connecting is done by one request at a time per
//! server, so a burst of requests to a cold server opens one connection, not one each.
//!
//! The transport is a `TcpStream` today; HTTP/2 over TLS (`protocol = "h2"`) needs only the
//! upstream TLS stream to be passed to `handshake` instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::snapshot::Server;
use crate::metrics::UpstreamErrorKind;
use crate::upstream;
use crate::upstream::state::now_ms;

/// The stream window we open to upstreams: large enough that one response is not held back
/// by a round trip per 64 KiB.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The decoded size of a response header block we accept, as for HTTP/1.1 heads.
const MAX_RESPONSE_HEADERS: u32 = crate::http1::response::MAX_RESPONSE_HEAD as u32;

#[derive(Debug, Default)]
pub struct H2Pool {
    servers: RwLock<HashMap<Arc<str>, Arc<ServerConns>>>,
}

/// One server's HTTP/2 connections.
#[derive(Debug, Default)]
pub struct ServerConns {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct H2Conn {
    send: SendRequest<Bytes>,
    /// Requests in flight on it.
    streams: AtomicUsize,
    /// Set when the connection ended or the server said GOAWAY.
    closed: Arc<AtomicBool>,
    /// When its last stream ended (`state::now_ms`), for the idle timeout.
    idle_since_ms: AtomicU64,
    /// The upstream's `timeouts.idle`: an unused connection is closed after it.
    idle_ms: u64,
}

/// One request's claim on a connection; dropping it frees the stream slot.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<H2Conn>,
    pub send: SendRequest<Bytes>,
    /// The connection was open before this request.
    pub reused: bool,
}

impl Lease {
    /// The server answered with GOAWAY or the connection failed: no new request goes there.
    pub fn retire(&self) {
        self.conn.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServerConns {
    fn try_lease(&self) -> Option<Lease> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        let conn = conns.iter().find(|c| {
            c.streams.load(Ordering::Relaxed) < c.send.current_max_send_streams().max(1)
        })?;
        Some(lease(conn, true))
    }
}

fn lease(conn: &Arc<H2Conn>, reused: bool) -> Lease {
    conn.streams.fetch_add(1, Ordering::Relaxed);
    Lease {
        conn: Arc::clone(conn),
        send: conn.send.clone(),
        reused,
    }
}

impl H2Pool {
    fn server(&self, server: &Server) -> Arc<ServerConns> {
        let list = server.h2.get_or_init(|| {
            let found = {
                let servers = self.servers.read().unwrap_or_else(PoisonError::into_inner);
                servers.get(&server.key).cloned()
            };
            found.unwrap_or_else(|| {
                let mut servers = self.servers.write().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(servers.entry(Arc::clone(&server.key)).or_default())
            })
        });
        Arc::clone(list)
    }

    /// Closes connections that carried no stream for their upstream's idle timeout, as
    /// `Pool::reap` does for HTTP/1.1: dropping the last handle lets h2 end the connection.
    pub fn reap(&self) {
        let now = now_ms();
        let servers: Vec<Arc<ServerConns>> = {
            let servers = self.servers.read().unwrap_or_else(PoisonError::into_inner);
            servers.values().cloned().collect()
        };
        for server in servers {
            let expired: Vec<Arc<H2Conn>> = {
                let mut conns = server.conns.lock().unwrap_or_else(PoisonError::into_inner);
                let (keep, expired) = std::mem::take(&mut *conns).into_iter().partition(|c| {
                    let unused = c.streams.load(Ordering::Relaxed) == 0
                        && now.saturating_sub(c.idle_since_ms.load(Ordering::Relaxed)) >= c.idle_ms;
                    !c.closed.load(Ordering::Relaxed) && !unused
                });
                *conns = keep;
                expired
            };
            drop(expired);
        }
    }

    /// A connection to `server` with room for one more stream: an open one, or a new one.
    /// `opened` is told when a new connection was made; `idle` is how long it may then sit
    /// unused.
    pub async fn lease(
        &self,
        server: &Server,
        dial: upstream::Dial<'_>,
        connect_timeout: Duration,
        idle: Duration,
        opened: impl FnOnce(),
    ) -> Result<Lease, UpstreamErrorKind> {
        let list = self.server(server);
        if let Some(lease) = list.try_lease() {
            return Ok(lease);
        }
        let _one_at_a_time = list.connecting.lock().await;
        if let Some(lease) = list.try_lease() {
            return Ok(lease);
        }
        let stream = upstream::connect(server.address, connect_timeout, dial).await?;
        let conn = handshake(stream, connect_timeout, idle).await?;
        opened();
        let lease = lease(&conn, false);
        list.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
        Ok(lease)
    }
}

/// The HTTP/2 handshake on a fresh transport; the connection is then driven by its own task.
async fn handshake<T>(
    io: T,
    timeout: Duration,
    idle: Duration,
) -> Result<Arc<H2Conn>, UpstreamErrorKind>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // An upstream is trusted more than a client, not blindly: its header blocks are
        // bounded as HTTP/1.1 response heads are.
        .max_header_list_size(MAX_RESPONSE_HEADERS)
        .handshake::<_, Bytes>(io);
    let (send, connection) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/2 handshake with upstream failed");
            return Err(UpstreamErrorKind::Connect);
        }
        Err(_) => return Err(UpstreamErrorKind::ConnectTimeout),
    };
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HTTP/2 upstream connection ended");
        }
        flag.store(true, Ordering::Relaxed);
    });
    Ok(Arc::new(H2Conn {
        send,
        streams: AtomicUsize::new(0),
        closed,
        idle_since_ms: AtomicU64::new(now_ms()),
        idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
    }))
}
