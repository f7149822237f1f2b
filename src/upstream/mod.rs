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

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::UpstreamErrorKind;

pub use pool::Pool;

/// A connection to one upstream server, and whether it came from the pool.
#[derive(Debug)]
pub struct UpstreamConn {
    pub stream: TcpStream,
    pub reused: bool,
}

/// Opens a new connection, bounded by `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamErrorKind> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Heads and small bodies go out in one write each; Nagle would only delay them.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(UpstreamErrorKind::ConnectRefused)
        }
        Ok(Err(_)) => Err(UpstreamErrorKind::Connect),
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
