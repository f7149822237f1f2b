//! One HTTP/2 client connection: the handshake with our limits, one task per stream, and the
//! ways a connection ends (GOAWAY on drain, on a reload that removed its listener, when idle,
//! and ENHANCE_YOUR_CALM when the client abuses it).
//!
//! Neighbours: `conn.rs` hands over connections that chose h2 by ALPN or sent the h2c
//! preface; each stream goes to `proxy::h2::serve_stream`; `guard.rs` watches the frames.
//! h2 enforces the settings below itself (RFC 9113 §6.5.2 limits, flow control, the
//! CONTINUATION and small-DATA guards); the tripwire adds what it does not count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::guard::{self, Guarded, Tripwire};
use crate::app::Shared;
use crate::metrics::Abuse;
use crate::proxy;
use crate::upstream::state::now_ms;

/// How long a connection that is going away abruptly may take to flush its GOAWAY.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// What the stream tasks of one connection share with its driver.
#[derive(Debug)]
pub struct ConnShared {
    pub peer: SocketAddr,
    pub peer_ip: Arc<[u8]>,
    pub tls: bool,
    /// With mTLS and a subject header on the listener: what the upstream is told.
    pub subject: Option<crate::conn::ClientSubject>,
    /// Streams whose task is still running.
    active: AtomicUsize,
    /// When the last stream task ended, for the idle timeout (`state::now_ms` clock).
    last_active_ms: AtomicU64,
    /// When a stream last got window from the client to send response bytes.
    last_progress_ms: AtomicU64,
    pub tripwire: Arc<Tripwire>,
}

/// Counts a stream as active while it lives.
pub struct StreamGuard(Arc<ConnShared>);

impl ConnShared {
    /// A stream was granted window: the client is reading.
    pub fn progressed(&self) {
        self.last_progress_ms.store(now_ms(), Relaxed);
    }

    /// A stream got no window since `since` (`state::now_ms`) and gave up. The connection is
    /// closed too when no stream on it got any window meanwhile: the client reads nothing.
    /// A client that only paused that one stream keeps its connection.
    pub fn stalled(&self, since: u64) -> bool {
        let stuck = self.last_progress_ms.load(Relaxed) <= since;
        if stuck {
            self.tripwire.trip_external(Abuse::SendTimeout);
        }
        stuck
    }
}

impl StreamGuard {
    pub fn conn(&self) -> &ConnShared {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.last_active_ms.store(now_ms(), Relaxed);
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Serves an HTTP/2 connection to its end. `prefix`: bytes already read from `io` (the h2c
/// preface). `stop` fires on drain and when the listener is removed by a reload.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, in conn.rs; the pieces are what it knows of the connection"
)]
pub async fn serve<T>(
    io: T,
    prefix: Bytes,
    peer: SocketAddr,
    peer_ip: Arc<[u8]>,
    tls: bool,
    subject: Option<crate::conn::ClientSubject>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    connected: Instant,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let snap = shared.config.load_full();
    let settings = snap.http2;
    let (io, tripwire) = Guarded::new(
        io,
        prefix,
        guard::Limits {
            max_client_resets: settings.max_client_resets,
            max_control_frames: settings.max_control_frames,
        },
    );
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_pending_accept_reset_streams(settings.max_pending_resets)
        .max_local_error_reset_streams(Some(settings.max_local_error_resets))
        // A stream buffers at most one window's worth of response; the rest waits upstream.
        .max_send_buffer_size(settings.stream_window as usize)
        // RFC 8441: WebSocket over HTTP/2, carried to HTTP/1.1 upstreams as an Upgrade.
        .enable_connect_protocol();
    let handshake = builder.handshake::<_, Bytes>(io);
    let mut conn =
        match tokio::time::timeout_at(connected + snap.timeouts.client_header, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %peer, "HTTP/2 handshake timed out");
                return;
            }
        };
    shared.metrics.http2_connection();
    let idle = snap.timeouts.client_idle;
    let grace = snap.timeouts.shutdown_grace;
    drop(snap);
    let cs = Arc::new(ConnShared {
        peer,
        peer_ip,
        tls,
        subject,
        active: AtomicUsize::new(0),
        last_active_ms: AtomicU64::new(now_ms()),
        last_progress_ms: AtomicU64::new(0),
        tripwire: Arc::clone(&tripwire),
    });
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let mut going_away = false;
    let mut gone_at: Option<Instant> = None;
    let abuse = loop {
        tokio::select! {
            biased;
            why = tripwire.tripped() => break Some(why),
            _ = stop.cancelled(), if !going_away => {
                // RFC 9113 §6.8: streams already started finish, new ones are refused.
                conn.graceful_shutdown();
                going_away = true;
                gone_at = Some(Instant::now());
                sleep.as_mut().reset(Instant::now() + grace);
            }
            () = &mut sleep => {
                if going_away {
                    // The streams that were let finish took longer than the grace.
                    if gone_at.is_some_and(|t| t.elapsed() >= grace) {
                        break None;
                    }
                    sleep.as_mut().reset(Instant::now() + grace);
                    continue;
                }
                let quiet = now_ms().saturating_sub(cs.last_active_ms.load(Relaxed));
                if cs.active.load(Relaxed) == 0 && quiet >= idle_ms {
                    conn.graceful_shutdown();
                    going_away = true;
                    gone_at = Some(Instant::now());
                    sleep.as_mut().reset(Instant::now() + grace);
                } else {
                    let left = idle_ms.saturating_sub(quiet).max(1);
                    sleep.as_mut().reset(Instant::now() + Duration::from_millis(left));
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    shared.metrics.http2_stream();
                    cs.active.fetch_add(1, Relaxed);
                    let stream = StreamGuard(Arc::clone(&cs));
                    tokio::spawn(proxy::h2::serve_stream(
                        request,
                        respond,
                        Arc::clone(&shared),
                        stream,
                    ));
                }
                Some(Err(e)) => {
                    // h2's own guards end the connection with ENHANCE_YOUR_CALM.
                    if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) && e.is_go_away() {
                        shared.metrics.http2_abuse(Abuse::Protocol);
                    }
                    tracing::debug!(client = %peer, error = %e, "HTTP/2 connection error");
                    break None;
                }
                None => break None,
            }
        }
    };
    if let Some(why) = abuse {
        shared.metrics.http2_abuse(why);
        tracing::info!(client = %peer, reason = why.as_str(), "HTTP/2 client abuse: GOAWAY");
        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
        // Drive the connection until the GOAWAY is out; a client that does not read gets
        // its socket closed when the time is up.
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            while let Some(Ok(_)) = conn.accept().await {}
        })
        .await;
    }
}
