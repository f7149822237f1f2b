//! THE SPINE: one request, from a parsed head to a finished response.
//!
//! `conn.rs` calls `handle` once per request with the config snapshot loaded for it. The phases,
//! in order, each a function below:
//!
//! 1. `route`      — router: (host, path) -> route, or 404.
//! 2. `respond`    — a `respond` route answers here.
//! 3. `forward`    — check the body limit, pick a server (balance), get a connection (pool or
//!    connect, moving to another server when a connect fails), send the head and stream the body,
//!    read the response head (retrying once on a fresh connection when a pooled one turns out
//!    dead and the request is safe to repeat), stream the response back, return the connection.
//! 4. `finish`     — metrics and the access-log entry, off the request path.
//!
//! Errors from any phase come back as `ProxyError`, which knows its status; if nothing was sent
//! to the client yet, `send_error` answers with it.
//!
//! HTTP/2 streams take the same phases in `h2.rs` (one task per stream, the request seen
//! through its HTTP/1.1 translation); `h2_upstream.rs` forwards to upstreams that speak
//! HTTP/2, for either kind of client.

mod acquire;
mod error;
pub mod h2;
mod h2_upstream;
mod tunnel;

use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use error::ProxyError;

use acquire::{acquire, answered, may_retry, pick_request, reopen, stale_pooled, try_failed};

use crate::access_log::AccessEntry;
use crate::app::Shared;
use crate::config::snapshot::{FixedResponse, Route, RouteAction, Snapshot, Upstream};
use crate::conn::Client;
use crate::deadline;
use crate::http1::body::{self, Decoder, Encoder, RelayError, RelayLimits};
use crate::http1::request::{Method, RequestHead};
use crate::http1::response::{self, ResponseHead};
use crate::http1::write::{self, Forwarded, Persistence};
use crate::http1::{Framing, Version};
use crate::metrics::UpstreamErrorKind;
use crate::upstream::select::Tried;
use crate::upstream::{self, UpstreamConn};

/// What `handle` tells the connection loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    KeepAlive,
    Close,
}

/// What is known about an exchange as it goes; feeds the keep-alive decision and the log.
struct Exchange {
    status: u16,
    bytes_sent: u64,
    /// Something of the response went to the client: an error can no longer be answered.
    response_started: bool,
    /// The request body was read to its end, so the next bytes are a new request.
    request_done: bool,
    response_done: bool,
    /// The response we sent says the connection closes.
    close_announced: bool,
    upstream: Option<std::net::SocketAddr>,
    upstream_time: Option<Duration>,
}

/// Serves one request on `client`. The head has been parsed and validated.
pub async fn handle(
    client: &mut Client,
    head: &RequestHead,
    snap: &Snapshot,
    shared: &Shared,
) -> Next {
    let started = Instant::now();
    let mut ex = Exchange {
        status: 0,
        bytes_sent: 0,
        response_started: false,
        request_done: !head.has_body(),
        response_done: false,
        close_announced: false,
        upstream: None,
        upstream_time: None,
    };
    let host = head.route_host();
    let route = snap.router.find(&host, head.bytes(head.path));
    let outcome = match route {
        None => Err(ProxyError::NoRoute),
        Some(route) => match &route.action {
            RouteAction::Respond(fixed) => respond(client, head, fixed, shared, &mut ex).await,
            RouteAction::Proxy(id) => {
                forward(client, head, route, snap.upstream(*id), shared, &mut ex).await
            }
        },
    };
    if let Err(err) = outcome {
        ex.status = err.status();
        if err.has_response() && !ex.response_started {
            send_error(client, head, &err, &mut ex).await;
        }
        tracing::debug!(client = %client.peer, status = ex.status, error = %err, "request failed");
    }
    finish(
        client.peer,
        head.version.as_str(),
        head,
        route.map(|r| &**r),
        shared,
        &ex,
        started,
    );
    // What the response said decides, not whether a drain began meanwhile: a client told the
    // connection persists may already be sending its next request on it, and closing now would
    // fail that request. The next response says `Connection: close` instead (`plan_response`),
    // and an idle connection is closed by the drain (`conn::wait_readable`).
    let keep_alive = head.keep_alive && ex.request_done && ex.response_done && !ex.close_announced;
    if keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// How the response to this client is delimited and whether the connection stays open.
fn plan_response(
    head: &RequestHead,
    upstream_framing: Framing,
    shared: &Shared,
    ex: &Exchange,
) -> (Framing, Persistence) {
    let framing = match (upstream_framing, head.version) {
        (Framing::Empty, _) => Framing::Empty,
        (Framing::Length(n), _) => Framing::Length(n),
        // An HTTP/1.0 client cannot read chunked framing: the body then ends with the connection.
        (Framing::Chunked | Framing::UntilClose, Version::Http10) => Framing::UntilClose,
        (Framing::Chunked | Framing::UntilClose, Version::Http11) => Framing::Chunked,
    };
    let keep_alive = head.keep_alive
        && ex.request_done
        && framing != Framing::UntilClose
        && !shared.is_draining();
    (framing, write::persistence_for(head.version, keep_alive))
}

async fn respond(
    client: &mut Client,
    head: &RequestHead,
    fixed: &FixedResponse,
    shared: &Shared,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    let (_, persistence) =
        plan_response(head, Framing::Length(fixed.body.len() as u64), shared, ex);
    write::local_response(
        &mut client.out,
        fixed.status,
        fixed.content_type.as_bytes(),
        fixed.body.len(),
        persistence,
    );
    let body: &[u8] = if head.method == Method::Head {
        &[]
    } else {
        &fixed.body
    };
    ex.status = fixed.status;
    ex.response_started = true;
    ex.close_announced = persistence == Persistence::Close;
    let mut bufs = [
        std::io::IoSlice::new(&client.out),
        std::io::IoSlice::new(body),
    ];
    body::write_all_vectored(&mut client.stream, &mut bufs)
        .await
        .map_err(|_| ProxyError::ClientGone)?;
    ex.bytes_sent = body.len() as u64;
    ex.response_done = true;
    Ok(())
}

async fn forward(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    upstream: &Upstream,
    shared: &Shared,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    match head.framing {
        Framing::Length(n) if n > route.max_body_bytes => return Err(ProxyError::BodyTooLarge),
        Framing::Chunked => {
            body::precheck_chunked(&client.buf).map_err(|e| match e {
                RelayError::Malformed(what) => ProxyError::ClientBody(what),
                _ => ProxyError::ClientBody("invalid chunked body"),
            })?;
        }
        _ => {}
    }
    if upstream.protocol.is_http2() {
        return h2_upstream::forward_from_h1(client, head, route, upstream, shared, ex).await;
    }
    let timeouts = route.upstream_timeouts.unwrap_or(upstream.timeouts);
    // One list for every try of this request, even if DNS swaps in a new one meanwhile: the
    // indices in `tried` refer to it.
    let targets = upstream.targets.load_full();
    let pick = pick_request(upstream, head, client.peer);
    let replay = buffer_body(client, head, route, ex).await?;
    // Whether the request may be sent again after it was sent once: the route says so, or it is
    // idempotent and has no body that was streamed away.
    let repeatable = if head.has_body() {
        replay.is_some()
    } else {
        route.retry_with_body || head.method.is_idempotent()
    };
    let retry = &upstream.retry;
    upstream.live.budget.deposit(retry.budget_ratio);

    let peer_ip = std::sync::Arc::clone(&client.peer_ip);
    // Cloned (two `Arc`s) only on a listener with mTLS and a subject header.
    let subject = client.subject.clone();
    let fwd = Forwarded {
        client_ip: &peer_ip,
        proto: if client.stream.is_tls() {
            b"https"
        } else {
            b"http"
        },
        subject: subject
            .as_ref()
            .map(|s| (s.header.as_bytes(), s.subject.as_deref().map(str::as_bytes))),
    };
    // A request that cannot be tried again gets its whole response_header time: cutting it at
    // the per-try limit would only turn a slow answer into a 504.
    let header_timeout = match retry.per_try_timeout {
        Some(per_try) if repeatable => per_try,
        _ => timeouts.response_header,
    };
    let mut up_buf = std::mem::take(&mut client.up_buf);
    let mut tried = Tried::default();
    let mut tries = 0u32;
    let mut fresh_retry_done = false;
    let started = Instant::now();
    let (server, mut conn, _in_flight, response) = loop {
        tries += 1;
        let (idx, conn, in_flight) =
            acquire(upstream, &targets, pick, &mut tried, shared, &timeouts).await?;
        let server = &targets.servers[idx];
        ex.upstream = Some(server.address);
        let mut conn = conn;
        if tries == 1 && replay.is_none() && head.expect_continue && head.has_body() {
            // We asked the upstream nothing about it (Expect is hop-by-hop here): the route
            // accepted the request, so invite the body now, as nginx does.
            client
                .stream
                .write_all(write::CONTINUE_100)
                .await
                .map_err(|_| ProxyError::ClientGone)?;
        }
        let try_started = Instant::now();
        let mut outcome = Err(ProxyError::NoServers);
        // `open` counts its own failures in the metrics.
        let mut counted = false;
        // At most twice on this server: the second time on a fresh connection, when the pooled
        // one turned out to be closed by the server as we used it.
        for _ in 0..2 {
            write::request_head(&mut client.out, head, fwd, head.framing);
            outcome = round_trip(
                client,
                head,
                route,
                &mut conn,
                &mut up_buf,
                replay.as_ref(),
                timeouts.write,
                header_timeout,
                ex,
            )
            .await;
            let stale = stale_pooled(&outcome, &conn, up_buf.is_empty());
            if !(stale && repeatable && !fresh_retry_done) {
                break;
            }
            // Not the server's fault: a keep-alive race. It gets one fresh connection; a
            // timeout or a partial response is not retried this way, the server may be
            // working on it.
            fresh_retry_done = true;
            up_buf.clear();
            match reopen(upstream, server, timeouts.connect, &outcome).await {
                Ok(c) => conn = c,
                Err(kind) => {
                    outcome = Err(ProxyError::Upstream(kind));
                    counted = true;
                    break;
                }
            }
        }
        let kind = match outcome {
            Ok(response) => {
                let rtt = try_started.elapsed();
                answered(upstream, &targets, server, response.status, rtt);
                break (server, conn, in_flight, response);
            }
            Err(ProxyError::Upstream(kind)) => kind,
            Err(other) => return Err(other),
        };
        try_failed(
            upstream,
            &targets,
            server,
            kind,
            counted,
            try_started.elapsed(),
        );
        if !may_retry(
            upstream,
            &targets,
            pick,
            &mut tried,
            server,
            kind,
            up_buf.is_empty(),
            repeatable,
            tries,
        ) {
            return Err(ProxyError::Upstream(kind));
        }
        up_buf.clear();
        tracing::debug!(server = %server.address, error = kind.as_str(), "retrying on another server");
    };

    if response.status == 101 {
        // Only ever read for a request that asked to upgrade (see `read_response_head`).
        write::switching_protocols(&mut client.out, &response);
        ex.status = 101;
        ex.response_started = true;
        ex.close_announced = true;
        client
            .stream
            .write_all(&client.out)
            .await
            .map_err(|_| ProxyError::ClientGone)?;
        ex.request_done = true;
        let early_up = client.buf.split();
        let moved = tunnel::run(
            &mut client.stream,
            &mut conn.stream,
            &early_up,
            &up_buf,
            timeouts.tunnel_idle,
        )
        .await;
        ex.bytes_sent = moved.to_client;
        ex.response_done = true;
        ex.upstream_time = Some(started.elapsed());
        up_buf.clear();
        client.up_buf = up_buf;
        return Ok(());
    }
    let (framing, persistence) = plan_response(head, response.framing, shared, ex);
    write::response_head(&mut client.out, &response, framing, persistence);
    if let Some(cookie) = &upstream.balance.sticky_cookie {
        if pick.sticky != Some(server.sticky_id) {
            let value = server.sticky_value();
            write::append_field(
                &mut client.out,
                b"Set-Cookie",
                &[cookie.as_bytes(), b"=", &value, b"; Path=/; HttpOnly"],
            );
        }
    }
    ex.status = response.status;
    ex.response_started = true;
    ex.close_announced = persistence == Persistence::Close;
    let mut decoder = Decoder::new(response.framing);
    let relayed = body::relay(
        &mut conn.stream,
        &mut up_buf,
        &mut decoder,
        &mut client.stream,
        &Encoder::new(framing),
        &mut client.out,
        RelayLimits {
            max_bytes: None,
            read_timeout: timeouts.read,
            // The client-side gap limit serves for sending too (nginx's send_timeout and
            // client_body_timeout share the same 60s default).
            write_timeout: route.client_body_timeout,
        },
    )
    .await;
    ex.upstream_time = Some(started.elapsed());
    match relayed {
        Ok(n) => {
            ex.bytes_sent = n;
            ex.response_done = true;
            if response.reusable && ex.request_done && up_buf.is_empty() {
                shared.pool.checkin(
                    server,
                    conn.stream,
                    upstream.max_idle_per_server,
                    timeouts.idle,
                );
            }
        }
        Err(e) => {
            // The head is out: the only honest signal left is to close the connection.
            ex.close_announced = true;
            if !e.is_write_side() {
                upstream.metrics.error(relay_error_kind(&e));
            }
            tracing::debug!(error = %e, "response body relay failed");
        }
    }
    up_buf.clear();
    client.up_buf = up_buf;
    Ok(())
}

/// Bodies up to this size are held in memory on a `retry_with_body` route, so that a retry can
/// send them again; larger ones are streamed and never retried once sent.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// On a `retry_with_body` route, reads a body of known, modest length whole before the first
/// try and takes it out of the client's buffer.
async fn buffer_body(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    ex: &mut Exchange,
) -> Result<Option<bytes::Bytes>, ProxyError> {
    let Framing::Length(n) = head.framing else {
        return Ok(None);
    };
    if !route.retry_with_body || n == 0 || n > REPLAY_LIMIT {
        return Ok(None);
    }
    let n = n as usize;
    if head.expect_continue {
        client
            .stream
            .write_all(write::CONTINUE_100)
            .await
            .map_err(|_| ProxyError::ClientGone)?;
    }
    client.buf.reserve(n.saturating_sub(client.buf.len()));
    while client.buf.len() < n {
        match deadline::limit(
            route.client_body_timeout,
            client.stream.read_buf(&mut client.buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::ClientGone),
            Ok(Ok(_)) => {}
            Err(_) => return Err(ProxyError::ClientTimeout),
        }
    }
    ex.request_done = true;
    Ok(Some(client.buf.split_to(n).freeze()))
}

/// Sends the request on `conn` and reads the final response head.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are all of one exchange"
)]
async fn round_trip(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    conn: &mut UpstreamConn,
    up_buf: &mut BytesMut,
    replay: Option<&bytes::Bytes>,
    write_timeout: Duration,
    header_timeout: Duration,
    ex: &mut Exchange,
) -> Result<ResponseHead, ProxyError> {
    match replay {
        Some(body) => {
            let mut bufs = [
                std::io::IoSlice::new(&client.out),
                std::io::IoSlice::new(body),
            ];
            match deadline::limit(
                write_timeout,
                body::write_all_vectored(&mut conn.stream, &mut bufs),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
                Err(_) => return Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
            }
        }
        None => send_request(client, head, route, conn, write_timeout, ex).await?,
    }
    read_response_head(conn, up_buf, head, client, header_timeout).await
}

/// Sends the head in `client.out` and the request body, if any.
async fn send_request(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    conn: &mut UpstreamConn,
    write_timeout: Duration,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    if !head.has_body() {
        return match deadline::limit(write_timeout, conn.stream.write_all(&client.out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
            Err(_) => Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
        };
    }
    let mut decoder = Decoder::new(head.framing);
    let sent = body::relay(
        &mut client.stream,
        &mut client.buf,
        &mut decoder,
        &mut conn.stream,
        &Encoder::new(head.framing),
        &mut client.out,
        RelayLimits {
            max_bytes: Some(route.max_body_bytes),
            read_timeout: route.client_body_timeout,
            write_timeout,
        },
    )
    .await;
    match sent {
        Ok(_) => {
            ex.request_done = true;
            Ok(())
        }
        Err(RelayError::TooLarge) => Err(ProxyError::BodyTooLarge),
        Err(RelayError::Malformed(what)) => Err(ProxyError::ClientBody(what)),
        Err(RelayError::ReadTimeout) => Err(ProxyError::ClientTimeout),
        Err(RelayError::Read(_) | RelayError::Truncated) => Err(ProxyError::ClientGone),
        Err(RelayError::WriteTimeout) => Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
        Err(RelayError::Write(e)) => Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
    }
}

/// Reads the final response head, relaying informational (1xx) ones other than 100 to the client.
async fn read_response_head(
    conn: &mut UpstreamConn,
    buf: &mut BytesMut,
    head: &RequestHead,
    client: &mut Client,
    timeout: Duration,
) -> Result<ResponseHead, ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match response::parse(buf, head.method == Method::Head) {
            Ok(Some(res)) if res.status == 100 => continue,
            Ok(Some(res)) if res.is_informational() => {
                if res.status == 101 {
                    if head.upgrade.is_some() {
                        return Ok(res);
                    }
                    // A switch nobody asked for is a broken upstream.
                    return Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse));
                }
                if head.version == Version::Http11 {
                    write::response_head(
                        &mut client.out,
                        &res,
                        Framing::Empty,
                        Persistence::KeepAlive,
                    );
                    client
                        .stream
                        .write_all(&client.out)
                        .await
                        .map_err(|_| ProxyError::ClientGone)?;
                }
                continue;
            }
            Ok(Some(res)) => return Ok(res),
            Ok(None) => {}
            Err(bad) => {
                tracing::debug!(error = %bad, "bad upstream response");
                return Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse));
            }
        }
        read_head_bytes(&mut conn.stream, buf, deadline).await?;
    }
}

/// Reads more of an upstream's response head into `buf`, by `deadline`: a close before any byte
/// is `ClosedEarly` (a pooled connection the server had closed), a close mid-head a bad response.
pub(super) async fn read_head_bytes(
    stream: &mut crate::stream::UpstreamStream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<(), ProxyError> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    match deadline::until(deadline, stream.read_buf(buf)).await {
        Ok(Ok(0)) if buf.is_empty() => Err(ProxyError::Upstream(UpstreamErrorKind::ClosedEarly)),
        Ok(Ok(0)) => Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse)),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
        Err(_) => Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
    }
}

fn relay_error_kind(e: &RelayError) -> UpstreamErrorKind {
    match e {
        RelayError::ReadTimeout => UpstreamErrorKind::Timeout,
        RelayError::Read(io) => upstream::io_error_kind(io),
        RelayError::Truncated => UpstreamErrorKind::ClosedEarly,
        _ => UpstreamErrorKind::BadResponse,
    }
}

/// Answers with the error's status and a one-line body. The connection is closed afterwards
/// unless the request was fully read and the client may send another.
async fn send_error(client: &mut Client, head: &RequestHead, err: &ProxyError, ex: &mut Exchange) {
    let body = err.body();
    // Unread body bytes would be taken for the next request: close unless the body was consumed.
    let keep_alive = head.keep_alive && ex.request_done;
    let persistence = write::persistence_for(head.version, keep_alive);
    write::local_response(
        &mut client.out,
        err.status(),
        b"text/plain; charset=utf-8",
        body.len(),
        persistence,
    );
    if matches!(err, ProxyError::Saturated) {
        // Every server is at its cap: ask well-behaved clients to come back shortly.
        write::append_field(&mut client.out, b"Retry-After", &[b"1"]);
    }
    ex.response_started = true;
    ex.close_announced = persistence == Persistence::Close;
    let body_bytes: &[u8] = if head.method == Method::Head {
        &[]
    } else {
        body.as_bytes()
    };
    let mut bufs = [
        std::io::IoSlice::new(&client.out),
        std::io::IoSlice::new(body_bytes),
    ];
    if body::write_all_vectored(&mut client.stream, &mut bufs)
        .await
        .is_ok()
    {
        ex.bytes_sent = body_bytes.len() as u64;
        ex.response_done = true;
    }
}

fn finish(
    peer: std::net::SocketAddr,
    protocol: &'static str,
    head: &RequestHead,
    route: Option<&Route>,
    shared: &Shared,
    ex: &Exchange,
    started: Instant,
) {
    let elapsed = started.elapsed();
    shared.metrics.observe_request(elapsed);
    if let Some(route) = route {
        route.metrics.record(ex.status);
    }
    if shared.access_log.is_enabled() && route.is_none_or(|r| r.access_log) {
        shared.access_log.log(AccessEntry {
            time: SystemTime::now(),
            client: peer,
            method: head.raw.slice(head.method_span.range()),
            target: head.raw.slice(head.target.range()),
            protocol,
            host: head.raw.slice(head.host.range()),
            status: ex.status,
            bytes_sent: ex.bytes_sent,
            duration: elapsed,
            upstream: ex.upstream,
            upstream_time: ex.upstream_time,
            route: route.map(|r| r.name.clone()),
        });
    }
}
