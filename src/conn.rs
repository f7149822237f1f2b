//! One task per client connection: read a request head, hand it to the proxy, repeat while the
//! connection stays persistent. A connection that speaks HTTP/2 (ALPN `h2`, or the h2c preface
//! on a listener with `http2 = true`) is handed to `http2::server` instead, after the TLS
//! handshake and before any HTTP/1.1 parsing.
//!
//! Neighbours: `listener.rs` accepts and spawns `serve`; `http1::request` parses each head;
//! `proxy::handle` serves the request. This module owns the client-side timeouts (header read,
//! keep-alive idle) and the drain on shutdown: a busy connection finishes its request with
//! `Connection: close`, and so does an idle one whose client sends one more request; those still
//! idle are closed a moment later (`app::IDLE_CLOSE_AFTER`).
//!
//! While a connection sits idle between requests it holds no buffers: they are released before
//! waiting and allocated again when bytes arrive, so ten thousand idle keep-alive clients cost
//! their sockets and little else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

pub use crate::stream::ClientStream;

use crate::access_log::AccessEntry;
use crate::app::Shared;
use crate::config::snapshot::{ConnLimits, TlsSettings};
use crate::deadline;
use crate::http1::request::{self, HeadError, RequestHead};
use crate::http1::write::{self, Persistence};
use crate::proxy::{self, Next, ProxyError};

/// First allocation for a request head; most heads fit, larger ones grow the buffer.
const HEAD_BUF: usize = 4096;

/// A client connection and the buffers its requests reuse.
pub struct Client {
    pub stream: ClientStream,
    pub peer: SocketAddr,
    /// The peer's IP as text, formatted once for X-Forwarded-For.
    pub peer_ip: Arc<[u8]>,
    /// Bytes read from the client and not yet consumed.
    pub buf: BytesMut,
    /// Scratch space for the heads we write.
    pub out: Vec<u8>,
    /// Read buffer for the upstream's response.
    pub up_buf: BytesMut,
    /// On a listener with `client_auth.subject_header`: that header and what goes in it.
    pub subject: Option<ClientSubject>,
}

/// The verified client certificate's subject, for the upstream: sent in `header` (whatever the
/// client itself sent in that header is dropped, so it cannot be forged).
#[derive(Debug, Clone)]
pub struct ClientSubject {
    /// Lower-case.
    pub header: Arc<str>,
    /// `None` when the client presented no certificate (`required = false`).
    pub subject: Option<Arc<str>>,
}

impl Client {
    fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = Vec::new();
        self.up_buf = BytesMut::new();
    }
}

/// Why no request head came.
enum NoHead {
    /// Closed, idle too long, or draining: nothing to answer.
    Quiet,
    /// The head was refused: answer with an error, then close.
    Refused(HeadError),
    /// The head did not arrive within `client_header`.
    TimedOut,
}

/// Serves one client connection to its end. `permit` is its slot under the listener's connection
/// cap, given back when this returns.
///
/// Written as a plain function returning an `async move` block rather than as an `async fn`:
/// an async fn keeps its arguments in the task as well as the locals they are moved into, and
/// every idle connection would carry that dead copy.
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    listener: ListenerConn,
) -> impl std::future::Future<Output = ()> {
    let ListenerConn { tls, http2, stop } = listener;
    let _ = stream.set_nodelay(true);
    shared.metrics.connection_opened();
    let connected = Instant::now();
    let mut client = Client {
        stream: ClientStream::Plain(stream),
        peer,
        peer_ip: peer.ip().to_string().into_bytes().into(),
        buf: BytesMut::new(),
        out: Vec::new(),
        up_buf: BytesMut::new(),
        subject: None,
    };
    async move {
        if let Some(tls) = tls {
            // Boxed like the exchange below: the handshake's state is large and short-lived.
            if !Box::pin(start_tls(&mut client, tls, &shared, connected)).await {
                shared.metrics.connection_closed();
                drop(permit);
                return;
            }
            let alpn_h2 = match &client.stream {
                ClientStream::Tls(s) => s
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| p == crate::tls::ALPN_H2),
                _ => None,
            };
            // h2 by ALPN; with no ALPN at all, some clients (gRPC ones among them) still
            // start HTTP/2 with its preface, as over cleartext.
            let h2 = match alpn_h2 {
                Some(chosen) => chosen,
                None => http2 && Box::pin(sniff_h2c(&mut client, &shared, connected)).await,
            };
            if h2 {
                Box::pin(serve_h2(client, Arc::clone(&shared), stop, connected)).await;
                shared.metrics.connection_closed();
                drop(permit);
                return;
            }
        } else if http2 && Box::pin(sniff_h2c(&mut client, &shared, connected)).await {
            Box::pin(serve_h2(client, Arc::clone(&shared), stop, connected)).await;
            shared.metrics.connection_closed();
            drop(permit);
            return;
        }
        let mut first = true;
        let linger = loop {
            if client.buf.is_empty() {
                // The first request must start within the header timeout; later ones within
                // the keep-alive idle timeout.
                let until = {
                    let config = shared.config.load();
                    if first {
                        connected + config.timeouts.client_header
                    } else {
                        Instant::now() + config.timeouts.client_idle
                    }
                };
                if wait_readable(&mut client, until, &shared).await.is_err() {
                    break false;
                }
            }
            // The busy part of a cycle is boxed: the task of an idle connection then holds
            // only the small waiting state above, not the room every phase of a request needs
            // (about 4.5 KiB). One allocation per request buys a small idle footprint.
            let head_started = if first { connected } else { Instant::now() };
            match Box::pin(exchange(&mut client, &shared, head_started)).await {
                Cycle::KeepAlive => {}
                Cycle::Close { linger } => break linger,
            }
            first = false;
            client.release_buffers();
        };
        if linger {
            // Boxed for the same reason as the exchange: its read buffer would otherwise be
            // part of every connection's task.
            Box::pin(close_gracefully(&mut client.stream)).await;
        } else {
            let _ = client.stream.shutdown().await;
        }
        shared.metrics.connection_closed();
        drop(permit);
    }
}

/// What the listener tells a connection about how to serve it.
pub struct ListenerConn {
    pub tls: Option<TlsSettings>,
    /// The listener speaks HTTP/2: by ALPN on TLS (or by preface when the client sent no
    /// ALPN), by preface (h2c with prior knowledge) on cleartext.
    pub http2: bool,
    /// Cancelled on drain and when a reload removes the listener: HTTP/2 connections then
    /// send GOAWAY (an HTTP/1.1 connection ends after its current request instead).
    pub stop: tokio_util::sync::CancellationToken,
}

/// Hands the connection to the HTTP/2 server, with any bytes already read.
async fn serve_h2(
    mut client: Client,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
    connected: Instant,
) {
    let stream = std::mem::replace(&mut client.stream, ClientStream::Closed);
    let tls = stream.is_tls();
    let prefix = client.buf.split().freeze();
    let Client {
        peer,
        peer_ip,
        subject,
        ..
    } = client;
    crate::http2::server::serve(
        stream, prefix, peer, peer_ip, tls, subject, shared, stop, connected,
    )
    .await;
}

/// On an h2c listener: reads until the first bytes either are the HTTP/2 connection preface
/// (RFC 9113 §3.4) or cannot be; true for HTTP/2. The bytes stay in `client.buf` either way.
async fn sniff_h2c(client: &mut Client, shared: &Shared, connected: Instant) -> bool {
    let preface = crate::http2::PREFACE;
    let deadline = connected + shared.config.load().timeouts.client_header;
    loop {
        let have = client.buf.len().min(preface.len());
        if client.buf[..have] != preface[..have] {
            return false;
        }
        if have == preface.len() {
            return true;
        }
        if client.buf.capacity() - client.buf.len() < 64 {
            client.buf.reserve(HEAD_BUF);
        }
        match deadline::until(deadline, client.stream.read_buf(&mut client.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed or silent: the HTTP/1.1 loop sees the same and ends quietly.
            _ => return false,
        }
    }
}

enum Cycle {
    KeepAlive,
    /// `linger`: unread client bytes may remain, so close without losing the last response.
    Close {
        linger: bool,
    },
}

/// One request on a connection whose first bytes have arrived: the rest of the head, then the
/// proxy. The snapshot is loaded once here: a reload between two requests applies to the second.
async fn exchange(client: &mut Client, shared: &Shared, head_started: Instant) -> Cycle {
    let snap = shared.config.load_full();
    let deadline = head_started + snap.timeouts.client_header;
    let head = read_head(client, &snap.limits, deadline).await;
    let head = match head {
        Ok(head) => head,
        Err(NoHead::Quiet) => return Cycle::Close { linger: false },
        Err(NoHead::Refused(e)) => {
            refuse(client, ProxyError::Head(e), shared).await;
            return Cycle::Close { linger: true };
        }
        Err(NoHead::TimedOut) => {
            refuse(client, ProxyError::ClientTimeout, shared).await;
            return Cycle::Close { linger: true };
        }
    };
    match proxy::handle(client, &head, &snap, shared).await {
        Next::KeepAlive => Cycle::KeepAlive,
        Next::Close => Cycle::Close { linger: true },
    }
}

/// Reads until a whole head is in the buffer, or the deadline passes.
async fn read_head(
    client: &mut Client,
    limits: &ConnLimits,
    deadline: Instant,
) -> Result<RequestHead, NoHead> {
    loop {
        if !client.buf.is_empty() {
            match request::parse(&mut client.buf, limits) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(NoHead::Refused(e)),
            }
        }
        if client.buf.capacity() - client.buf.len() < 512 {
            client.buf.reserve(HEAD_BUF);
        }
        match deadline::until(deadline, client.stream.read_buf(&mut client.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(NoHead::Quiet),
            Ok(Ok(_)) => {}
            Err(_) => return Err(NoHead::TimedOut),
        }
    }
}

/// The TLS handshake, bounded by the header timeout; false when it failed and the connection
/// is done.
async fn start_tls(
    client: &mut Client,
    tls: TlsSettings,
    shared: &Shared,
    connected: Instant,
) -> bool {
    let timeout = shared.config.load().timeouts.client_header;
    let ClientStream::Plain(tcp) = std::mem::replace(&mut client.stream, ClientStream::Closed)
    else {
        return false;
    };
    let accept = tokio_rustls::TlsAcceptor::from(tls.config).accept(tcp);
    match tokio::time::timeout_at(connected + timeout, accept).await {
        Ok(Ok(stream)) => {
            if let Some(header) = tls.subject_header {
                // Verified by rustls against the listener's client CAs by now.
                let subject = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(crate::tls::subject)
                    .map(Arc::from);
                client.subject = Some(ClientSubject { header, subject });
            }
            client.stream = ClientStream::Tls(Box::new(stream));
            true
        }
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failed();
            tracing::debug!(client = %client.peer, error = %e, "TLS handshake failed");
            false
        }
        Err(_) => {
            shared.metrics.tls_handshake_failed();
            tracing::debug!(client = %client.peer, "TLS handshake timed out");
            false
        }
    }
}

/// Waits, holding no buffer, until the client sends something; then reads it.
async fn wait_readable(client: &mut Client, until: Instant, shared: &Shared) -> Result<(), NoHead> {
    let ClientStream::Plain(stream) = &mut client.stream else {
        // rustls may hold decrypted bytes already: only a read can tell.
        client.buf.reserve(HEAD_BUF);
        return tokio::select! {
            // Biased, here and below: a request that has arrived is read and answered before a
            // drain closes the connection; closing on it would fail that request.
            biased;
            read = client.stream.read_buf(&mut client.buf) => match read {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(NoHead::Quiet),
            },
            _ = tokio::time::sleep_until(until) => Err(NoHead::Quiet),
            _ = shared.close_idle.cancelled() => Err(NoHead::Quiet),
        };
    };
    loop {
        // `poll_read_ready` parks the waker in the socket's own registration; `readable()`
        // would put a 150-byte waiter in every idle connection's task.
        let ready = std::future::poll_fn(|cx| stream.poll_read_ready(cx));
        tokio::select! {
            biased;
            ready = ready => ready.map_err(|_| NoHead::Quiet)?,
            _ = tokio::time::sleep_until(until) => return Err(NoHead::Quiet),
            _ = shared.close_idle.cancelled() => return Err(NoHead::Quiet),
        }
        client.buf.reserve(HEAD_BUF);
        match stream.try_read_buf(&mut client.buf) {
            Ok(0) => return Err(NoHead::Quiet),
            Ok(_) => {
                if client.buf.len() < client.buf.capacity() {
                    // A short read drained the socket. Say so, as tokio's own `poll_read` does,
                    // so the next wait goes straight to epoll instead of first paying for a
                    // read that can only return EAGAIN (one syscall per request saved).
                    let _ = stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(NoHead::Quiet),
        }
    }
}

/// Answers a request we could not even parse, and closes.
async fn refuse(client: &mut Client, err: ProxyError, shared: &Shared) {
    let status = err.status();
    let body = err.body();
    write::local_response(
        &mut client.out,
        status,
        b"text/plain; charset=utf-8",
        body.len(),
        Persistence::Close,
    );
    client.out.extend_from_slice(body.as_bytes());
    let _ =
        tokio::time::timeout(Duration::from_secs(5), client.stream.write_all(&client.out)).await;
    shared.metrics.observe_request(Duration::ZERO);
    // Refused requests are logged too, as nginx logs its 400s: they are what an operator looks
    // for when a client misbehaves. Method and target are unknown, the head was not parsed.
    if shared.access_log.is_enabled() {
        shared.access_log.log(AccessEntry {
            time: std::time::SystemTime::now(),
            client: client.peer,
            method: bytes::Bytes::new(),
            target: bytes::Bytes::new(),
            protocol: "",
            host: bytes::Bytes::new(),
            status,
            bytes_sent: body.len() as u64,
            duration: Duration::ZERO,
            upstream: None,
            upstream_time: None,
            route: None,
        });
    }
    tracing::debug!(client = %client.peer, status, error = %err, "request refused");
}

/// Closes so that the last response is not lost: shut our side, then read and discard what the
/// client still sends for a short while. Closing with unread bytes would make the kernel send
/// RST, and a client may then drop the response it has not read yet (nginx's lingering close).
async fn close_gracefully(stream: &mut ClientStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut budget: usize = 256 * 1024;
    while budget > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle keep-alive connection is one task of this size (benchmarks.md, optimisation
    /// log, entry 2): it was 4,776 bytes before the busy part of a cycle was boxed. Not a timing
    /// check: a structural guard against an await that pulls request state back into the task.
    #[tokio::test]
    async fn idle_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let config = "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n\
                      [[route]]\npath = \"/\"\nrespond = { status = 200 }\n";
        let snapshot =
            crate::config::load_str(std::path::Path::new("t.toml"), config, &metrics).unwrap();
        let shared = Arc::new(Shared::new(snapshot, metrics, Default::default()));
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let listener = ListenerConn {
            tls: None,
            http2: true,
            stop: Default::default(),
        };
        let task = serve(stream, addr, shared, permit, listener);
        assert!(
            std::mem::size_of_val(&task) <= 640,
            "a connection task is {} bytes",
            std::mem::size_of_val(&task)
        );
    }
}
