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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::snapshot::Server;
use crate::metrics::UpstreamErrorKind;
use crate::upstream;

/// The stream window we open to upstreams: large enough that one response is not held back
/// by a round trip per 64 KiB.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

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

    /// A connection to `server` with room for one more stream: an open one, or a new one.
    /// `opened` is told when a new connection was made.
    pub async fn lease(
        &self,
        server: &Server,
        connect_timeout: Duration,
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
        let tcp = upstream::connect(server.address, connect_timeout).await?;
        let conn = handshake(tcp, connect_timeout).await?;
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
async fn handshake<T>(io: T, timeout: Duration) -> Result<Arc<H2Conn>, UpstreamErrorKind>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
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
    }))
}
