//! Choosing the server for one try and getting a connection to it: the request's hash key and
//! sticky cookie, the upstream's selection (`upstream::select`), the in-flight claim against
//! `max_conns`, the wait queue when every server is full, the pool or a fresh connect, and the
//! record of a failure against the server (passive health).
//!
//! Neighbours: `proxy::forward` calls `pick_request` once per request and `acquire` once per
//! try, and `server_failed` when a try fails after the connection was made.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::ProxyError;
use crate::app::Shared;
use crate::balance::{stable_hash, Algorithm, HashKey};
use crate::config::snapshot::{Server, Targets, Upstream, UpstreamTimeouts};
use crate::http1::request::RequestHead;
use crate::metrics::UpstreamErrorKind;
use crate::upstream::select::{self, NoServer, Tried};
use crate::upstream::state::{now_ms, UpstreamFailure};
use crate::upstream::targets::InFlight;
use crate::upstream::{self, UpstreamConn};

/// What the request brings to the choice of server: its consistent-hash key, its sticky cookie.
pub(super) fn pick_request(
    upstream: &Upstream,
    head: &RequestHead,
    peer: std::net::SocketAddr,
) -> select::Request {
    let hash = match &upstream.balance.algorithm {
        Algorithm::ConsistentHash(key) => match key {
            HashKey::ClientIp => Some(match peer.ip() {
                std::net::IpAddr::V4(ip) => stable_hash(&ip.octets()),
                std::net::IpAddr::V6(ip) => stable_hash(&ip.octets()),
            }),
            HashKey::Path => Some(stable_hash(head.bytes(head.path))),
            HashKey::Header(name) => head.field(name).map(stable_hash),
            HashKey::Cookie(name) => head.cookie(name).map(stable_hash),
        },
        _ => None,
    };
    let sticky = upstream
        .balance
        .sticky_cookie
        .as_deref()
        .and_then(|name| head.cookie(name))
        .and_then(|value| std::str::from_utf8(value).ok())
        .filter(|value| value.len() == 16)
        .and_then(|value| u64::from_str_radix(value, 16).ok());
    select::Request { hash, sticky }
}

fn server_index(targets: &Targets, server: &Server) -> usize {
    targets
        .servers
        .iter()
        .position(|s| std::ptr::eq(s, server))
        .unwrap_or(usize::MAX)
}

/// Whether a try that failed this way deserves the same request once more, on a fresh
/// connection to the same server: a pooled connection the server had closed while it idled (it
/// died before sending a byte of a response). Not the server's fault, a keep-alive race; a
/// timeout or a partial response is not retried this way, the server may be working on it.
pub(super) fn stale_pooled<T>(
    outcome: &Result<T, ProxyError>,
    conn: &UpstreamConn,
    nothing_read: bool,
) -> bool {
    matches!(
        outcome,
        Err(ProxyError::Upstream(
            UpstreamErrorKind::ClosedEarly | UpstreamErrorKind::Reset
        ))
    ) && conn.reused
        && nothing_read
}

/// Replaces a stale pooled connection with a fresh one; the stale one's error is counted here,
/// a failed connect by `open`.
pub(super) async fn reopen<T>(
    upstream: &Upstream,
    server: &Server,
    connect_timeout: Duration,
    stale: &Result<T, ProxyError>,
) -> Result<UpstreamConn, UpstreamErrorKind> {
    if let Err(ProxyError::Upstream(kind)) = stale {
        upstream.metrics.error(*kind);
    }
    open(upstream, server, connect_timeout).await
}

/// Records an answer from `server` for passive health and latency: a 5xx counts as a failure
/// when the upstream says so, anything else as a success taking `rtt`.
pub(super) fn answered(
    upstream: &Upstream,
    targets: &Targets,
    server: &Server,
    status: u16,
    rtt: Duration,
) {
    if status >= 500 && upstream.outlier.count_5xx {
        server_failed(
            upstream,
            targets,
            server,
            UpstreamFailure::Status(status),
            rtt,
        );
    } else {
        server
            .state
            .record_success(rtt, crate::upstream::state::now_ns());
    }
}

/// Records a try that failed with `kind` after the connection was made: in the upstream's
/// error counts (unless `open` already counted it) and against the server.
pub(super) fn try_failed(
    upstream: &Upstream,
    targets: &Targets,
    server: &Server,
    kind: UpstreamErrorKind,
    counted: bool,
    took: Duration,
) {
    if !counted {
        upstream.metrics.error(kind);
    }
    server_failed(upstream, targets, server, UpstreamFailure::Io(kind), took);
}

/// Counts a failure against `server` for passive health, ejecting it when that is due.
pub(super) fn server_failed(
    upstream: &Upstream,
    targets: &Targets,
    server: &Server,
    what: UpstreamFailure,
    took: Duration,
) {
    // What a failure costs in the latency estimate: at least a second, so that a server that
    // fails fast does not look like the fastest one.
    let penalty = took.max(Duration::from_secs(1));
    let ejected = server
        .state
        .record_failure(what, penalty, &upstream.outlier, || {
            select::may_eject(upstream, targets, &server.state)
        });
    if ejected {
        let left = server.state.ejected_for(now_ms()).unwrap_or(0);
        tracing::warn!(
            upstream = %upstream.name,
            server = %server.address,
            reason = what.as_str(),
            "server ejected for {left} ms after {} consecutive failures",
            upstream.outlier.consecutive_failures
        );
    }
}

/// Picks a server and gets a connection to it: a pooled one, or a new one. A failed connect is
/// always safe to try elsewhere (nothing was sent), so it moves on to another server, without
/// counting as a retry; when every server is at its `max_conns`, the request waits in the
/// upstream's queue, if it has one.
pub(super) async fn acquire<'t>(
    upstream: &'t Upstream,
    targets: &'t Targets,
    pick: select::Request,
    tried: &mut Tried,
    shared: &Shared,
    timeouts: &UpstreamTimeouts,
) -> Result<(usize, UpstreamConn, InFlight<'t>), ProxyError> {
    let most = targets.servers.len().clamp(1, MAX_CONNECT_TRIES);
    let mut last = ProxyError::NoServers;
    let mut failed = 0;
    let mut queued_until = None;
    while failed < most {
        let idx = match select::select(upstream, targets, pick, *tried) {
            Ok(idx) => idx,
            Err(NoServer::None) => break,
            Err(NoServer::Saturated) => {
                wait_for_server(upstream, targets, pick, *tried, &mut queued_until).await?;
                continue;
            }
        };
        let server = &targets.servers[idx];
        // Counted from now, before any await, so that requests picking at the same moment see
        // each other; a race lost at the cap picks again.
        let Some(in_flight) = server.try_begin(&upstream.live) else {
            continue;
        };
        if let Some(stream) = shared.pool.checkout(server, upstream.tls.is_some()) {
            upstream.metrics.connections_reused.fetch_add(1, Relaxed);
            let conn = UpstreamConn {
                stream,
                reused: true,
            };
            return Ok((idx, conn, in_flight));
        }
        match open(upstream, server, timeouts.connect).await {
            Ok(conn) => return Ok((idx, conn, in_flight)),
            Err(kind) => {
                // Nothing was sent: a connect failure costs no latency sample.
                try_failed(upstream, targets, server, kind, true, Duration::ZERO);
                tried.add(idx);
                failed += 1;
                last = ProxyError::Upstream(kind);
            }
        }
    }
    Err(last)
}

/// Whether a failed try moves on to another server. Only what cannot have been acted on twice
/// is retried: nothing of a response came (`nothing_read`), and the request is safe to repeat.
/// A timeout is retried only when a per-try timeout says the server had its chance; without
/// one the request has used its whole time. Then another server must be left, and the retry
/// budget must allow it (counted here, so call this only once per failed try).
#[allow(
    clippy::too_many_arguments,
    reason = "the facts of one failed try, from the two forwarding loops"
)]
pub(super) fn may_retry(
    upstream: &Upstream,
    targets: &Targets,
    pick: select::Request,
    tried: &mut Tried,
    server: &Server,
    kind: UpstreamErrorKind,
    nothing_read: bool,
    repeatable: bool,
    tries: u32,
) -> bool {
    let retry = &upstream.retry;
    let died_before_answering = matches!(
        kind,
        UpstreamErrorKind::ClosedEarly | UpstreamErrorKind::Reset
    ) && nothing_read;
    let timed_out = kind == UpstreamErrorKind::Timeout && retry.per_try_timeout.is_some();
    // Only after a stale pooled connection: the fresh one could not even be opened.
    let not_connected = matches!(
        kind,
        UpstreamErrorKind::ConnectRefused
            | UpstreamErrorKind::ConnectTimeout
            | UpstreamErrorKind::Connect
            | UpstreamErrorKind::Tls
    );
    let retryable = died_before_answering || timed_out || not_connected;
    if !(repeatable && retryable) || tries >= retry.attempts {
        return false;
    }
    tried.add(server_index(targets, server));
    if select::select(upstream, targets, pick, *tried) == Err(NoServer::None) {
        // No other server to try: the client hears what went wrong with this one.
        return false;
    }
    if !upstream
        .live
        .budget
        .withdraw(retry.budget_min_per_second, now_ms())
    {
        upstream.metrics.retries_refused.fetch_add(1, Relaxed);
        return false;
    }
    upstream.metrics.retries.fetch_add(1, Relaxed);
    true
}

/// A request tries at most this many servers that refuse or time out its connect.
const MAX_CONNECT_TRIES: usize = 8;

/// Waits in the upstream's queue until a server is under its cap again, or answers 503.
pub(super) async fn wait_for_server(
    upstream: &Upstream,
    targets: &Targets,
    pick: select::Request,
    tried: Tried,
    queued_until: &mut Option<tokio::time::Instant>,
) -> Result<(), ProxyError> {
    let live = &upstream.live;
    let queue = upstream.queue;
    let deadline = match *queued_until {
        Some(d) => d,
        None => {
            let prior = live.pending.load(Relaxed);
            if prior >= queue.max_pending {
                upstream.metrics.saturated.fetch_add(1, Relaxed);
                return Err(ProxyError::Saturated);
            }
            upstream.metrics.queued.fetch_add(1, Relaxed);
            let d = tokio::time::Instant::now() + queue.timeout;
            *queued_until = Some(d);
            d
        }
    };
    let _waiting = Waiting::join(&live.pending);
    let notified = live.released.notified();
    tokio::pin!(notified);
    // Registered before looking again, so a release between the two is not missed.
    notified.as_mut().enable();
    if !matches!(
        select::select(upstream, targets, pick, tried),
        Err(NoServer::Saturated)
    ) {
        return Ok(());
    }
    if tokio::time::timeout_at(deadline, notified).await.is_err() {
        upstream.metrics.saturated.fetch_add(1, Relaxed);
        return Err(ProxyError::Saturated);
    }
    Ok(())
}

/// One request counted in an upstream's queue while it lives, however the wait ends.
struct Waiting<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Waiting<'a> {
    fn join(pending: &'a std::sync::atomic::AtomicU32) -> Waiting<'a> {
        pending.fetch_add(1, Relaxed);
        Waiting(pending)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Opens a new connection to `server`, counting it (or its failure) in the upstream's metrics.
pub(super) async fn open(
    upstream: &Upstream,
    server: &Server,
    connect_timeout: Duration,
) -> Result<UpstreamConn, UpstreamErrorKind> {
    let dial = upstream::Dial {
        tls: upstream.tls.as_deref(),
        host_name: server.host_name.as_deref(),
    };
    match upstream::connect(server.address, connect_timeout, dial).await {
        Ok(stream) => {
            upstream.metrics.connections_opened.fetch_add(1, Relaxed);
            Ok(UpstreamConn {
                stream,
                reused: false,
            })
        }
        Err(kind) => {
            upstream.metrics.error(kind);
            tracing::debug!(server = %server.address, error = kind.as_str(), "connect failed");
            Err(kind)
        }
    }
}
