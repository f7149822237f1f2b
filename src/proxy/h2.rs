//! One HTTP/2 stream, through the same phases as `proxy::handle`: route, respond or forward
//! (pick a server, connect or reuse, retry), finish (metrics, access log).
//!
//! Neighbours: `http2::server` spawns `serve_stream` for every stream it accepts;
//! `http2::translate` gives the HTTP/1.1 view of the request that the router, the balancer and
//! `http1::write` use, so an HTTP/2 request is routed and forwarded by the rules an HTTP/1.1
//! one is. Forwarding goes to an HTTP/1.1 upstream (`forward_h1` here: pooled connections, the
//! body framed by its length when known, else chunked, trailers both ways, WebSocket by RFC
//! 8441) or to an HTTP/2 one (`h2_upstream::forward_h2`: a stream on a shared connection, both
//! bodies moving at once, as gRPC's bidirectional calls need).
//!
//! Flow control is end to end: request DATA is released to the client only once written
//! upstream, and response bytes are read from the upstream only as the client's window lets
//! them out, so a slow side slows the other instead of filling memory. A response that cannot
//! get window for `http2.send_timeout` is reset, and its connection closed when no stream on
//! it got window either (zero-window readers). The phase before a response is raced against the client's RST_STREAM, so a reset
//! stream stops costing the upstream anything (Rapid Reset).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{self, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::acquire::{
    acquire, answered, may_retry, pick_request, reopen, stale_pooled, try_failed,
};
use super::{finish, h2_upstream, relay_error_kind, Exchange, ProxyError, REPLAY_LIMIT};
use crate::access_log::AccessEntry;
use crate::app::Shared;
use crate::config::snapshot::{
    FixedResponse, Route, RouteAction, Server, Upstream, UpstreamProtocol, UpstreamTimeouts,
};
use crate::deadline;
use crate::http1::body::{self, Decoded, Decoder, Encoder};
use crate::http1::request::{Method, RequestHead};
use crate::http1::response::{self, ResponseHead};
use crate::http1::write::{self, Forwarded};
use crate::http1::Framing;
use crate::http2::server::{ConnShared, StreamGuard};
use crate::http2::translate::{self, BodyKnown};
use crate::metrics::UpstreamErrorKind;
use crate::upstream::select::Tried;
use crate::upstream::state::now_ms;
use crate::upstream::{self, UpstreamConn};

/// Serves one stream to its end.
pub async fn serve_stream(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
    stream: StreamGuard,
) {
    let started = Instant::now();
    let snap = shared.config.load_full();
    let conn = stream.conn();
    let (parts, mut body) = request.into_parts();
    let mut ex = Exchange {
        status: 0,
        bytes_sent: 0,
        response_started: false,
        request_done: body.is_end_stream(),
        response_done: false,
        close_announced: false,
        upstream: None,
        upstream_time: None,
    };
    let known = if body.is_end_stream() {
        BodyKnown::None
    } else {
        BodyKnown::Streaming
    };
    let head = match translate::request_head(&parts, known, &snap.limits) {
        Ok(head) => head,
        Err(e) => {
            let err = ProxyError::Head(e);
            send_error(&mut respond, false, &err, &mut ex).await;
            refused(conn, &parts, &shared, &ex);
            tracing::debug!(client = %conn.peer, error = %err, "HTTP/2 request refused");
            return;
        }
    };
    let host = head.route_host();
    let route = snap.router.find(&host, head.bytes(head.path));
    let outcome = match route {
        None => Err(ProxyError::NoRoute),
        Some(route) => match &route.action {
            RouteAction::Respond(fixed) => respond_fixed(&mut respond, &head, fixed, &mut ex),
            RouteAction::Proxy(id) => {
                let upstream = snap.upstream(*id);
                let s = Stream {
                    head: &head,
                    parts: &parts,
                    route,
                    upstream,
                    shared: &shared,
                    conn,
                    send_timeout: snap.http2.send_timeout,
                    limits: &snap.limits,
                };
                match upstream.protocol {
                    UpstreamProtocol::Http1 => {
                        forward_h1(&s, &mut respond, &mut body, &mut ex).await
                    }
                    UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
                        h2_upstream::forward_h2(&s, &mut respond, &mut body, &mut ex).await
                    }
                }
            }
        },
    };
    if let Err(err) = outcome {
        ex.status = err.status();
        if err.has_response() && !ex.response_started {
            send_error(&mut respond, head.method == Method::Head, &err, &mut ex).await;
        }
        tracing::debug!(client = %conn.peer, status = ex.status, error = %err, "HTTP/2 request failed");
    }
    finish(
        conn.peer,
        PROTOCOL,
        &head,
        route.map(|r| &**r),
        &shared,
        &ex,
        started,
    );
    drop(stream);
}

/// What one forwarded stream works with.
pub(super) struct Stream<'a> {
    pub(super) head: &'a RequestHead,
    pub(super) parts: &'a http::request::Parts,
    pub(super) route: &'a Route,
    pub(super) upstream: &'a Upstream,
    pub(super) shared: &'a Shared,
    pub(super) conn: &'a ConnShared,
    pub(super) send_timeout: Duration,
    pub(super) limits: &'a crate::config::snapshot::ConnLimits,
}

/// How the access log names the protocol of a request that came as an HTTP/2 stream.
const PROTOCOL: &str = "HTTP/2.0";

/// A request whose head could not be used is logged as `conn.rs` logs a refused HTTP/1.1 head.
fn refused(conn: &ConnShared, parts: &http::request::Parts, shared: &Shared, ex: &Exchange) {
    shared.metrics.observe_request(Duration::ZERO);
    if shared.access_log.is_enabled() {
        shared.access_log.log(AccessEntry {
            time: std::time::SystemTime::now(),
            client: conn.peer,
            method: Bytes::copy_from_slice(parts.method.as_str().as_bytes()),
            target: Bytes::copy_from_slice(
                parts
                    .uri
                    .path_and_query()
                    .map_or("", |p| p.as_str())
                    .as_bytes(),
            ),
            protocol: PROTOCOL,
            host: Bytes::new(),
            status: ex.status,
            bytes_sent: ex.bytes_sent,
            duration: Duration::ZERO,
            upstream: None,
            upstream_time: None,
            route: None,
        });
    }
}

fn local_response(status: u16, content_type: &str, len: usize) -> http::Response<()> {
    let mut res = http::Response::new(());
    *res.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let h = res.headers_mut();
    h.insert(header::SERVER, HeaderValue::from_static("gatehouse"));
    if len > 0 || !matches!(status, 204 | 304) {
        if let Ok(ct) = HeaderValue::from_str(content_type) {
            h.insert(header::CONTENT_TYPE, ct);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    res
}

/// A small body in one DATA frame: h2 holds it until the window lets it out, within its
/// per-stream send buffer.
fn send_small(
    respond: &mut SendResponse<Bytes>,
    res: http::Response<()>,
    body: Bytes,
    ex: &mut Exchange,
) {
    ex.response_started = true;
    let empty = body.is_empty();
    match respond.send_response(res, empty) {
        Ok(mut send) => {
            let len = body.len() as u64;
            if empty || send.send_data(body, true).is_ok() {
                ex.bytes_sent = len;
                ex.response_done = true;
            }
        }
        Err(e) => tracing::debug!(error = %e, "HTTP/2 response not sent"),
    }
}

fn respond_fixed(
    respond: &mut SendResponse<Bytes>,
    head: &RequestHead,
    fixed: &FixedResponse,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    ex.status = fixed.status;
    let res = local_response(fixed.status, &fixed.content_type, fixed.body.len());
    let body = if head.method == Method::Head {
        Bytes::new()
    } else {
        fixed.body.clone()
    };
    send_small(respond, res, body, ex);
    Ok(())
}

async fn send_error(
    respond: &mut SendResponse<Bytes>,
    is_head: bool,
    err: &ProxyError,
    ex: &mut Exchange,
) {
    ex.status = err.status();
    let text = err.body();
    let mut res = local_response(err.status(), "text/plain; charset=utf-8", text.len());
    if matches!(err, ProxyError::Saturated) {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    let body = if is_head {
        Bytes::new()
    } else {
        translate::body_bytes(&text)
    };
    send_small(respond, res, body, ex);
}

/// Why a response could not be sent on.
pub(super) enum SendFail {
    /// The client reset the stream or the connection ended.
    Gone,
    /// No window for `send_timeout`: the stream was reset and the connection is closing.
    Stalled,
}

/// Sends `data` as the client's window allows, never more than it allows: h2 buffers nothing
/// beyond what was granted, so a client that does not read costs us one window, not a body.
/// A stream that gets no window for `timeout` is reset (zero-window readers); see
/// `ConnShared::stalled` for when its connection goes too.
pub(super) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    timeout: Duration,
    conn: &ConnShared,
) -> Result<(), SendFail> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let waiting_since = now_ms();
        let granted =
            tokio::time::timeout(timeout, std::future::poll_fn(|cx| send.poll_capacity(cx))).await;
        match granted {
            Ok(Some(Ok(n))) => {
                let n = n.min(data.len());
                if n > 0 {
                    conn.progressed();
                    send.send_data(data.split_to(n), false)
                        .map_err(|_| SendFail::Gone)?;
                }
            }
            Ok(Some(Err(_)) | None) => return Err(SendFail::Gone),
            Err(_) => {
                send.send_reset(h2::Reason::CANCEL);
                conn.stalled(waiting_since);
                return Err(SendFail::Stalled);
            }
        }
    }
    Ok(())
}

/// Resolves when the client resets the stream.
pub(super) async fn client_reset(respond: &mut SendResponse<Bytes>) {
    let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
}

/// For a body of unknown length (no content-length, so chunked to an HTTP/1.1 upstream), the
/// first DATA frame is awaited before anything goes upstream: HTTP/2 clients often send a
/// small body whole in one frame, or end a GET with an empty one. Such a body then goes with
/// a Content-Length (or none at all), which every HTTP/1.1 server takes and which lets a GET
/// be retried; the head for it is returned. Otherwise the frame is handed back to lead the
/// chunked body. Not with `Expect: 100-continue`, whose client waits for us first.
async fn first_frame(
    body: &mut RecvStream,
    s: &Stream<'_>,
    ex: &mut Exchange,
) -> Result<(Option<RequestHead>, Option<Bytes>), ProxyError> {
    let (head, route) = (s.head, s.route);
    if head.framing != Framing::Chunked || head.expect_continue {
        return Ok((None, None));
    }
    let first = match deadline::limit(route.client_body_timeout, body.data()).await {
        Err(_) => return Err(ProxyError::ClientTimeout),
        Ok(Some(Err(_))) => return Err(ProxyError::ClientGone),
        Ok(None) => Bytes::new(),
        Ok(Some(Ok(chunk))) => chunk,
    };
    if !body.is_end_stream() {
        return Ok((None, (!first.is_empty()).then_some(first)));
    }
    let n = first.len() as u64;
    if n > route.max_body_bytes {
        return Err(ProxyError::BodyTooLarge);
    }
    let _ = body.flow_control().release_capacity(first.len());
    let known = if n == 0 {
        BodyKnown::None
    } else {
        BodyKnown::Whole(n)
    };
    let whole = translate::request_head(s.parts, known, s.limits).map_err(ProxyError::Head)?;
    ex.request_done = true;
    Ok((Some(whole), (n > 0).then_some(first)))
}

/// On a `retry_with_body` route, a body of known, modest length is read whole first.
async fn buffer_body(
    body: &mut RecvStream,
    head: &RequestHead,
    route: &Route,
    ex: &mut Exchange,
) -> Result<Option<Bytes>, ProxyError> {
    let Framing::Length(n) = head.framing else {
        return Ok(None);
    };
    if !route.retry_with_body || n == 0 || n > REPLAY_LIMIT {
        return Ok(None);
    }
    let mut whole = BytesMut::with_capacity(n as usize);
    loop {
        match deadline::limit(route.client_body_timeout, body.data()).await {
            Err(_) => return Err(ProxyError::ClientTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ProxyError::ClientGone),
            Ok(Some(Ok(chunk))) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                whole.extend_from_slice(&chunk);
            }
        }
    }
    ex.request_done = true;
    Ok(Some(whole.freeze()))
}

/// To an HTTP/1.1 upstream: the same tries, retries and pooling as `proxy::forward`.
async fn forward_h1(
    s: &Stream<'_>,
    respond: &mut SendResponse<Bytes>,
    body: &mut RecvStream,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    let (route, upstream, shared) = (s.route, s.upstream, s.shared);
    if let Framing::Length(n) = s.head.framing {
        if n > route.max_body_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
    }
    let (whole_head, first) = first_frame(body, s, ex).await?;
    let head = whole_head.as_ref().unwrap_or(s.head);
    let timeouts = route.upstream_timeouts.unwrap_or(upstream.timeouts);
    let targets = upstream.targets.load_full();
    let pick = pick_request(upstream, head, s.conn.peer);
    if head.expect_continue && head.has_body() {
        let mut cont = http::Response::new(());
        *cont.status_mut() = http::StatusCode::CONTINUE;
        let _ = respond.send_informational(cont);
    }
    // A body that came whole in its first frame is sent with the head, as a replayable one
    // is; the rest stream.
    let (replay, first) = match (whole_head.is_some(), first) {
        (true, whole) => (whole, None),
        (false, first) => (buffer_body(body, head, route, ex).await?, first),
    };
    let repeatable = if head.has_body() {
        replay.is_some() && route.retry_with_body
    } else {
        route.retry_with_body || head.method.is_idempotent()
    };
    let retry = &upstream.retry;
    upstream.live.budget.deposit(retry.budget_ratio);
    let fwd = Forwarded {
        client_ip: &s.conn.peer_ip,
        proto: if s.conn.tls { b"https" } else { b"http" },
        subject: s
            .conn
            .subject
            .as_ref()
            .map(|c| (c.header.as_bytes(), c.subject.as_deref().map(str::as_bytes))),
    };
    let header_timeout = match retry.per_try_timeout {
        Some(per_try) if repeatable => per_try,
        _ => timeouts.response_header,
    };
    let mut out = Vec::new();
    let mut up_buf = BytesMut::new();
    let started = Instant::now();
    let tries = async {
        let mut tried = Tried::default();
        let mut tries = 0u32;
        let mut fresh_retry_done = false;
        loop {
            tries += 1;
            let (idx, conn, in_flight) =
                acquire(upstream, &targets, pick, &mut tried, shared, &timeouts).await?;
            let server = &targets.servers[idx];
            ex.upstream = Some(server.address);
            let mut conn = conn;
            let try_started = Instant::now();
            let mut outcome = Err(ProxyError::NoServers);
            let mut counted = false;
            for _ in 0..2 {
                write::request_head(&mut out, head, fwd, head.framing);
                // We can carry trailers back to an HTTP/2 client (gRPC over HTTP/1.1 needs
                // them); RFC 9110 §10.1.4 says so with TE, named in Connection.
                write::append_field(&mut out, b"TE", &[b"trailers"]);
                write::append_field(&mut out, b"Connection", &[b"TE"]);
                outcome = round_trip_h1(
                    body,
                    s,
                    head,
                    first.clone(),
                    &mut conn,
                    &mut out,
                    &mut up_buf,
                    replay.as_ref(),
                    &timeouts,
                    header_timeout,
                    ex,
                )
                .await;
                let stale = stale_pooled(&outcome, &conn, up_buf.is_empty());
                if !(stale && repeatable && !fresh_retry_done) {
                    break;
                }
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
                    return Ok((server, conn, in_flight, response));
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
        }
    };
    // Until the response head is here, a client's RST_STREAM ends the exchange at once.
    let (server, mut conn, _in_flight, response) = tokio::select! {
        done = tries => done?,
        () = client_reset(respond) => return Err(ProxyError::ClientGone),
    };
    if response.status == 101 {
        // RFC 8441 §5: the WebSocket is open; the client hears 200 and the stream carries it.
        let mut res = translate::response_from_h1(&response, false)
            .map_err(|_| ProxyError::Upstream(UpstreamErrorKind::BadResponse))?;
        *res.status_mut() = http::StatusCode::OK;
        let drop_names = ["sec-websocket-accept", "content-length"];
        for name in drop_names {
            res.headers_mut().remove(name);
        }
        ex.status = 200;
        ex.response_started = true;
        let mut send = respond
            .send_response(res, false)
            .map_err(|_| ProxyError::ClientGone)?;
        let early = up_buf.split().freeze();
        let moved = tunnel_h2(
            body,
            &mut send,
            &mut conn.stream,
            early,
            timeouts.tunnel_idle,
            s,
        )
        .await;
        ex.bytes_sent = moved;
        ex.request_done = true;
        ex.response_done = true;
        ex.upstream_time = Some(started.elapsed());
        return Ok(());
    }

    let length_known = matches!(response.framing, Framing::Length(_) | Framing::Empty);
    let mut res = translate::response_from_h1(&response, length_known)
        .map_err(|_| ProxyError::Upstream(UpstreamErrorKind::BadResponse))?;
    sticky_cookie(&mut res, upstream, pick.sticky, server);
    ex.status = response.status;
    ex.response_started = true;
    let empty = response.framing == Framing::Empty;
    let mut send = respond
        .send_response(res, empty)
        .map_err(|_| ProxyError::ClientGone)?;
    if empty {
        ex.response_done = true;
        ex.upstream_time = Some(started.elapsed());
        if response.reusable && ex.request_done && up_buf.is_empty() {
            shared.pool.checkin(
                server,
                conn.stream,
                upstream.max_idle_per_server,
                timeouts.idle,
            );
        }
        return Ok(());
    }
    let mut decoder = Decoder::new(response.framing);
    decoder.keep_trailers();
    let mut eof = false;
    let relayed: Result<(), Option<UpstreamErrorKind>> = loop {
        match decoder.decode(&mut up_buf, eof) {
            Ok(Decoded::Data(data)) => {
                let n = data.len() as u64;
                match send_all(&mut send, data, s.send_timeout, s.conn).await {
                    Ok(()) => ex.bytes_sent += n,
                    Err(_) => break Err(None),
                }
            }
            Ok(Decoded::NeedMore) => {
                if up_buf.capacity() - up_buf.len() < body::READ_CHUNK / 4 {
                    up_buf.reserve(body::READ_CHUNK);
                }
                match deadline::limit(timeouts.read, conn.stream.read_buf(&mut up_buf)).await {
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(Some(upstream::io_error_kind(&e))),
                    Err(_) => break Err(Some(UpstreamErrorKind::Timeout)),
                }
            }
            Ok(Decoded::Done) => break Ok(()),
            Err(e) => break Err(Some(relay_error_kind(&e))),
        }
    };
    ex.upstream_time = Some(started.elapsed());
    match relayed {
        Ok(()) => {
            let ended = match decoder.take_trailers() {
                Some(block) => send.send_trailers(translate::trailers_from_h1(&block)),
                None => send.send_data(Bytes::new(), true),
            };
            if ended.is_ok() {
                ex.response_done = true;
            }
            if response.reusable && ex.request_done && up_buf.is_empty() {
                shared.pool.checkin(
                    server,
                    conn.stream,
                    upstream.max_idle_per_server,
                    timeouts.idle,
                );
            }
        }
        Err(kind) => {
            // The head is out: the client learns of the failure by the stream's reset.
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            if let Some(kind) = kind {
                upstream.metrics.error(kind);
                tracing::debug!(error = kind.as_str(), "response body relay failed");
            }
        }
    }
    Ok(())
}

/// A WebSocket over HTTP/2 (RFC 8441) to an HTTP/1.1 upstream that switched protocols: the
/// stream's DATA both ways is the upstream connection's bytes, until either side ends or
/// nothing moved either way for `idle`. Returns the bytes sent to the client.
async fn tunnel_h2<U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    body: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    up: &mut U,
    early: Bytes,
    idle: Duration,
    s: &Stream<'_>,
) -> u64 {
    use std::sync::atomic::AtomicU64;
    let last = AtomicU64::new(now_ms());
    let (mut up_read, mut up_write) = tokio::io::split(up);
    let to_upstream = async {
        while let Some(Ok(data)) = body.data().await {
            let n = data.len();
            if up_write.write_all(&data).await.is_err() {
                break;
            }
            let _ = body.flow_control().release_capacity(n);
            last.store(now_ms(), Relaxed);
        }
        let _ = up_write.shutdown().await;
    };
    let to_client = async {
        let mut total = early.len() as u64;
        if !early.is_empty() && send_all(send, early, s.send_timeout, s.conn).await.is_err() {
            return total;
        }
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(16 * 1024);
            match up_read.read_buf(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = send.send_data(Bytes::new(), true);
                    return total;
                }
                Ok(n) => {
                    if send_all(send, buf.split().freeze(), s.send_timeout, s.conn)
                        .await
                        .is_err()
                    {
                        return total;
                    }
                    total += n as u64;
                    last.store(now_ms(), Relaxed);
                }
            }
        }
    };
    tokio::select! {
        (_, sent) = async { tokio::join!(to_upstream, to_client) } => sent,
        () = super::tunnel::idle_for(&last, idle) => {
            send.send_reset(h2::Reason::CANCEL);
            0
        }
    }
}

pub(super) fn sticky_cookie(
    res: &mut http::Response<()>,
    upstream: &Upstream,
    pinned: Option<u64>,
    server: &Server,
) {
    if let Some(cookie) = &upstream.balance.sticky_cookie {
        if pinned != Some(server.sticky_id) {
            let value = server.sticky_value();
            let mut text = Vec::with_capacity(cookie.len() + value.len() + 24);
            text.extend_from_slice(cookie.as_bytes());
            text.push(b'=');
            text.extend_from_slice(&value);
            text.extend_from_slice(b"; Path=/; HttpOnly");
            if let Ok(v) = HeaderValue::from_bytes(&text) {
                res.headers_mut().append(header::SET_COOKIE, v);
            }
        }
    }
}

/// Sends the head in `out` and the body, then reads the response head.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces are all of one exchange"
)]
async fn round_trip_h1(
    body: &mut RecvStream,
    s: &Stream<'_>,
    head: &RequestHead,
    first: Option<Bytes>,
    conn: &mut UpstreamConn,
    out: &mut Vec<u8>,
    up_buf: &mut BytesMut,
    replay: Option<&Bytes>,
    timeouts: &UpstreamTimeouts,
    header_timeout: Duration,
    ex: &mut Exchange,
) -> Result<ResponseHead, ProxyError> {
    let written = match replay {
        Some(b) => {
            let mut bufs = [std::io::IoSlice::new(out), std::io::IoSlice::new(b)];
            deadline::limit(
                timeouts.write,
                body::write_all_vectored(&mut conn.stream, &mut bufs),
            )
            .await
        }
        None if !head.has_body() => {
            deadline::limit(timeouts.write, conn.stream.write_all(out)).await
        }
        None => {
            upload_h1(body, s, head, first, conn, out, timeouts.write).await?;
            ex.request_done = true;
            Ok(Ok(()))
        }
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
        Err(_) => return Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
    }
    let deadline = tokio::time::Instant::now() + header_timeout;
    loop {
        match response::parse(up_buf, head.method == Method::Head) {
            // 1xx are not relayed over HTTP/2 (100 was sent already if asked for); a 101
            // nobody asked for is a broken upstream.
            Ok(Some(res)) if res.status == 101 => {
                if head.upgrade.is_some() {
                    return Ok(res);
                }
                return Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse));
            }
            Ok(Some(res)) if res.is_informational() => continue,
            Ok(Some(res)) => return Ok(res),
            Ok(None) => {}
            Err(bad) => {
                tracing::debug!(error = %bad, "bad upstream response");
                return Err(ProxyError::Upstream(UpstreamErrorKind::BadResponse));
            }
        }
        super::read_head_bytes(&mut conn.stream, up_buf, deadline).await?;
    }
}

/// Streams the request body to an HTTP/1.1 upstream, releasing the client's window only as
/// the upstream takes the bytes; trailers end a chunked body.
async fn upload_h1(
    body: &mut RecvStream,
    s: &Stream<'_>,
    head: &RequestHead,
    first: Option<Bytes>,
    conn: &mut UpstreamConn,
    out: &mut Vec<u8>,
    write_timeout: Duration,
) -> Result<(), ProxyError> {
    let route = s.route;
    let encoder = Encoder::new(head.framing);
    let write_err = |e: Result<std::io::Result<()>, deadline::Elapsed>| match e {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ProxyError::Upstream(upstream::io_error_kind(&e))),
        Err(_) => Err(ProxyError::Upstream(UpstreamErrorKind::Timeout)),
    };
    let mut total = 0u64;
    let mut first = first;
    loop {
        let next = match first.take() {
            Some(chunk) => Ok(Some(Ok(chunk))),
            None => deadline::limit(route.client_body_timeout, body.data()).await,
        };
        match next {
            Err(_) => return Err(ProxyError::ClientTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ProxyError::ClientGone),
            Ok(Some(Ok(chunk))) => {
                total += chunk.len() as u64;
                if total > route.max_body_bytes {
                    return Err(ProxyError::BodyTooLarge);
                }
                write_err(
                    deadline::limit(write_timeout, encoder.write(&mut conn.stream, out, &chunk))
                        .await,
                )?;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        }
    }
    if head.framing != Framing::Chunked {
        return write_err(
            deadline::limit(write_timeout, encoder.finish(&mut conn.stream, out)).await,
        );
    }
    let trailers = match deadline::limit(route.client_body_timeout, body.trailers()).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Err(ProxyError::ClientGone),
        Err(_) => return Err(ProxyError::ClientTimeout),
    };
    let last = match &trailers {
        Some(map) => translate::last_chunk_with_trailers(map),
        None => b"0\r\n\r\n".to_vec(),
    };
    let mut bufs = [std::io::IoSlice::new(out), std::io::IoSlice::new(&last)];
    let sent = deadline::limit(
        write_timeout,
        body::write_all_vectored(&mut conn.stream, &mut bufs),
    )
    .await;
    out.clear();
    write_err(sent)
}
