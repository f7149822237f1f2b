//! Upstream servers: which ones there are (`targets`, kept current by `resolve`), how each is
//! doing (`state`, fed by `health` and by the request path), which one takes a request
//! (`select`), how many retries are allowed (`budget`), and the connections to them (`connect`
//! here, and the `pool` that keeps them warm).
//!
//! Neighbours: `proxy.rs` asks `select` for a server and `pool`/`connect` for a connection to
//! it, records the outcome in the server's state, and hands the connection back to the pool
//! when the exchange left it reusable.

pub mod budget;
pub mod health;
pub mod pool;
pub mod resolve;
pub mod select;
pub mod state;
pub mod targets;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::UpstreamErrorKind;
use crate::stream::UpstreamStream;

pub use pool::Pool;

/// A connection to one upstream server, and whether it came from the pool.
pub struct UpstreamConn {
    pub stream: UpstreamStream,
    pub reused: bool,
}

/// What a new connection needs besides the address: the upstream's TLS client, if it has one,
/// and the server's host name for it.
#[derive(Clone, Copy)]
pub struct Dial<'a> {
    pub tls: Option<&'a tls::UpstreamTls>,
    pub host_name: Option<&'a str>,
}

impl Dial<'_> {
    pub const PLAIN: Dial<'static> = Dial {
        tls: None,
        host_name: None,
    };
}

/// Opens a new connection, and runs the TLS handshake when the upstream has TLS, all bounded by
/// `timeout`.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    dial: Dial<'_>,
) -> Result<UpstreamStream, UpstreamErrorKind> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Heads and small bodies go out in one write each; Nagle would only delay them.
            let _ = stream.set_nodelay(true);
            stream
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(UpstreamErrorKind::ConnectRefused)
        }
        Ok(Err(_)) => return Err(UpstreamErrorKind::Connect),
        Err(_) => return Err(UpstreamErrorKind::ConnectTimeout),
    };
    let Some(tls) = dial.tls else {
        return Ok(UpstreamStream::Plain(stream));
    };
    let handshake = tls.handshake(stream, dial.host_name, addr.ip());
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => Ok(UpstreamStream::Tls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::debug!(server = %addr, error = %e, "TLS handshake with upstream failed");
            Err(UpstreamErrorKind::Tls)
        }
        Err(_) => Err(UpstreamErrorKind::ConnectTimeout),
    }
}

/// Maps an I/O error on an established upstream connection to the kind we count and act on.
pub fn io_error_kind(e: &io::Error) -> UpstreamErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => UpstreamErrorKind::Reset,
        io::ErrorKind::UnexpectedEof => UpstreamErrorKind::ClosedEarly,
        io::ErrorKind::TimedOut => UpstreamErrorKind::Timeout,
        _ => UpstreamErrorKind::Reset,
    }
}
