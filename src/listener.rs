//! Binds the listening sockets and accepts client connections, up to a cap.
//!
//! Neighbours: `reload.rs` binds every configured listener through `bind` and runs `accept_loop`;
//! each accepted connection becomes a `conn::serve` task. At the connection cap the loop stops
//! accepting (the kernel's backlog holds newcomers) rather than accepting and dropping them.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;
use crate::conn;

/// Pending connections the kernel may queue for us (nginx's default `backlog` on Linux is 511).
const BACKLOG: i32 = 1024;

/// Binds `addr` with SO_REUSEADDR, so a restart does not wait out TIME_WAIT.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop` (the drain, or a reload that removed this listener); the listener is
/// closed when this returns, so later connection attempts are refused at once instead of
/// hanging. Each connection holds one of `permits` while it lives: the listener's cap.
pub async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    connections: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Read per connection, so that a reload's new certificates apply to the next one.
                let (tls, http2) = shared
                    .config
                    .load()
                    .listeners
                    .iter()
                    .find(|l| *l.name == *name)
                    .map_or((None, false), |l| (l.tls.clone(), l.http2));
                let listener = conn::ListenerConn {
                    tls,
                    http2,
                    stop: stop.clone(),
                };
                connections.spawn(conn::serve(
                    stream,
                    peer,
                    Arc::clone(&shared),
                    permit,
                    listener,
                ));
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
