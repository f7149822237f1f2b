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

mod error;

use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use error::ProxyError;

use crate::access_log::AccessEntry;
use crate::app::Shared;
use crate::config::snapshot::{
    FixedResponse, Route, RouteAction, Server, Snapshot, Upstream, UpstreamTimeouts,
};
use crate::conn::Client;
use crate::deadline;
use crate::http1::body::{self, Decoder, Encoder, RelayError, RelayLimits};
use crate::http1::request::{Method, RequestHead};
use crate::http1::response::{self, ResponseHead};
use crate::http1::write::{self, Forwarded, Persistence};
use crate::http1::{Framing, Version};
use crate::metrics::UpstreamErrorKind;
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
    finish(client, head, route.map(|r| &**r), shared, &ex, started);
    let keep_alive = head.keep_alive
        && ex.request_done
        && ex.response_done
        && !ex.close_announced
        && !shared.is_draining();
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
    let timeouts = route.upstream_timeouts.unwrap_or(upstream.timeouts);
    let started = Instant::now();
    let (server_idx, mut conn) = acquire(upstream, shared, timeouts.connect).await?;
    let server = &upstream.servers[server_idx];
    ex.upstream = Some(server.address);

    let peer_ip = std::sync::Arc::clone(&client.peer_ip);
    let fwd = Forwarded {
        client_ip: &peer_ip,
        proto: b"http",
    };
    write::request_head(&mut client.out, head, fwd, head.framing);
    if head.expect_continue && head.has_body() {
        // We asked the upstream nothing about it (Expect is hop-by-hop here): the route accepted
        // the request, so invite the body now, as nginx does.
        client
            .stream
            .write_all(write::CONTINUE_100)
            .await
            .map_err(|_| ProxyError::ClientGone)?;
    }

    let retryable = head.method.is_idempotent() && !head.has_body();
    let mut up_buf = std::mem::take(&mut client.up_buf);
    let first = round_trip(client, head, route, &mut conn, &mut up_buf, &timeouts, ex).await;
    let response = match first {
        Ok(r) => r,
        Err(ProxyError::Upstream(
            kind @ (UpstreamErrorKind::ClosedEarly | UpstreamErrorKind::Reset),
        )) if conn.reused && retryable && up_buf.is_empty() => {
            // A pooled connection the server closed as we used it, before a byte of response:
            // the request is safe to send again, once, on a connection we open now. A timeout
            // or a partial response is not retried: the server may be working on it.
            upstream.metrics.error(kind);
            up_buf.clear();
            conn = open(upstream, server, timeouts.connect)
                .await
                .map_err(ProxyError::Upstream)?;
            write::request_head(&mut client.out, head, fwd, head.framing);
            round_trip(client, head, route, &mut conn, &mut up_buf, &timeouts, ex)
                .await
                .inspect_err(|e| count_upstream_error(upstream, e))?
        }
        Err(e) => {
            count_upstream_error(upstream, &e);
            return Err(e);
        }
    };

    let (framing, persistence) = plan_response(head, response.framing, shared, ex);
    write::response_head(&mut client.out, &response, framing, persistence);
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

/// Picks a server and gets a connection to it: a pooled one, or a new one. A failed connect is
/// always safe to try elsewhere, so it moves on to the next pick, a bounded number of times.
async fn acquire(
    upstream: &Upstream,
    shared: &Shared,
    connect_timeout: Duration,
) -> Result<(usize, UpstreamConn), ProxyError> {
    use std::sync::atomic::Ordering::Relaxed;
    let attempts = upstream.servers.len().clamp(1, 3);
    let mut last = ProxyError::NoServers;
    for _ in 0..attempts {
        let idx = upstream.balancer.pick().ok_or(ProxyError::NoServers)?;
        let server = &upstream.servers[idx];
        if let Some(stream) = shared.pool.checkout(server) {
            upstream.metrics.connections_reused.fetch_add(1, Relaxed);
            return Ok((
                idx,
                UpstreamConn {
                    stream,
                    reused: true,
                },
            ));
        }
        match open(upstream, server, connect_timeout).await {
            Ok(conn) => return Ok((idx, conn)),
            Err(kind) => last = ProxyError::Upstream(kind),
        }
    }
    Err(last)
}

/// Opens a new connection to `server`, counting it (or its failure) in the upstream's metrics.
async fn open(
    upstream: &Upstream,
    server: &Server,
    connect_timeout: Duration,
) -> Result<UpstreamConn, UpstreamErrorKind> {
    match upstream::connect(server.address, connect_timeout).await {
        Ok(stream) => {
            upstream
                .metrics
                .connections_opened
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// Sends the request on `conn` and reads the final response head.
async fn round_trip(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    conn: &mut UpstreamConn,
    up_buf: &mut BytesMut,
    timeouts: &UpstreamTimeouts,
    ex: &mut Exchange,
) -> Result<ResponseHead, ProxyError> {
    send_request(client, head, route, conn, timeouts.write, ex).await?;
    read_response_head(conn, up_buf, head, client, timeouts.response_header).await
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
                    // We never forward Upgrade, so a switch of protocols is a broken upstream.
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
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match deadline::until(deadline, conn.stream.read_buf(buf)).await {
            Ok(Ok(0)) if buf.is_empty() => {
                return Err(ProxyError::Upstream(UpstreamErrorKind::ClosedEarly))
            }
            Ok(Ok(0)) => return Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
            Err(_) => return Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
        }
    }
}

fn count_upstream_error(upstream: &Upstream, e: &ProxyError) {
    if let ProxyError::Upstream(kind) = e {
        upstream.metrics.error(*kind);
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
    client: &Client,
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
            client: client.peer,
            method: head.raw.slice(head.method_span.range()),
            target: head.raw.slice(head.target.range()),
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
