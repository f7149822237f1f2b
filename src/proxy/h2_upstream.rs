//! Forwarding to an HTTP/2 upstream (`protocol = "h2c"`), from either kind of client.
//!
//! Neighbours: `proxy::h2` sends HTTP/2 clients' streams here (`forward_h2`), `proxy::forward`
//! sends HTTP/1.1 clients' requests (`forward_from_h1`). Both pick a server as `acquire` does
//! (the same selection, caps and queue), lease a stream on one of its shared connections
//! (`http2::client`), and record the outcome on the server. From an HTTP/2 client both bodies
//! move at once, as gRPC's bidirectional calls need; from an HTTP/1.1 client, which sends its
//! whole request before it reads, the request body goes first, then the response, re-framed
//! for HTTP/1.1 (its trailers are dropped, as RFC 9112 §7.1.2 allows).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::acquire::{server_failed, try_failed, wait_for_server};
use super::h2::{client_reset, send_all, sticky_cookie, Stream};
use super::{plan_response, Exchange, ProxyError};
use crate::app::Shared;
use crate::config::snapshot::{Route, Server, Targets, Upstream, UpstreamTimeouts};
use crate::conn::Client;
use crate::deadline;
use crate::http1::body::{self, Decoded, Decoder, Encoder};
use crate::http1::request::{Method, RequestHead};
use crate::http1::write::{self, Persistence};
use crate::http1::{FieldKind, Framing};
use crate::http2::client::Lease;
use crate::http2::translate;
use crate::metrics::UpstreamErrorKind;
use crate::upstream::select::{self, NoServer, Tried};
use crate::upstream::state::{now_ns, UpstreamFailure};
use crate::upstream::targets::InFlight;

/// WebSocket (an Upgrade, or RFC 8441's extended CONNECT) is carried to HTTP/1.1 upstreams
/// only; an HTTP/2 upstream would need extended CONNECT of its own.
const NO_TUNNEL: crate::http1::request::HeadError =
    crate::http1::request::HeadError::Malformed("WebSocket is not supported to an h2c upstream");

/// What one request to an HTTP/2 upstream works with.
struct Target<'a> {
    upstream: &'a Upstream,
    shared: &'a Shared,
    targets: &'a Targets,
    pick: select::Request,
    timeouts: UpstreamTimeouts,
}

/// Picks a server and leases a stream on one of its HTTP/2 connections, moving on to another
/// server when connecting fails, and waiting in the upstream's queue when every server is at
/// its `max_conns` (as `acquire` does for HTTP/1.1).
async fn acquire_h2<'a>(
    t: &Target<'a>,
    tried: &mut Tried,
) -> Result<(usize, Lease, InFlight<'a>), ProxyError> {
    let (upstream, targets) = (t.upstream, t.targets);
    let most = targets.servers.len().clamp(1, 8);
    let mut last = ProxyError::NoServers;
    let mut failed = 0;
    let mut queued_until = None;
    while failed < most {
        let idx = match select::select(upstream, targets, t.pick, *tried) {
            Ok(idx) => idx,
            Err(NoServer::None) => break,
            Err(NoServer::Saturated) => {
                wait_for_server(upstream, targets, t.pick, *tried, &mut queued_until).await?;
                continue;
            }
        };
        let server = &targets.servers[idx];
        let Some(in_flight) = server.try_begin(&upstream.live) else {
            continue;
        };
        let opened = || {
            upstream.metrics.connections_opened.fetch_add(1, Relaxed);
        };
        let dial = crate::upstream::Dial {
            tls: upstream.tls.as_deref(),
            host_name: server.host_name.as_deref(),
        };
        match t
            .shared
            .h2_pool
            .lease(server, dial, t.timeouts.connect, t.timeouts.idle, opened)
            .await
        {
            Ok(lease) => {
                if lease.reused {
                    upstream.metrics.connections_reused.fetch_add(1, Relaxed);
                }
                return Ok((idx, lease, in_flight));
            }
            Err(kind) => {
                // Nothing was sent: a connect failure costs no latency sample.
                try_failed(upstream, targets, server, kind, false, Duration::ZERO);
                tried.add(idx);
                failed += 1;
                last = ProxyError::Upstream(kind);
            }
        }
    }
    Err(last)
}

/// An HTTP/2 upstream's response head: already awaited, or still to come.
enum Head {
    Ready(Result<Result<http::Response<RecvStream>, h2::Error>, tokio::time::error::Elapsed>),
    Pending(h2::client::ResponseFuture),
}

/// A stream opened on an upstream server.
struct Opened<'a> {
    server: &'a Server,
    /// Holds the stream's slot on its connection, and the in-flight count on the server.
    _lease: Lease,
    _in_flight: InFlight<'a>,
    head: Head,
    send: SendStream<Bytes>,
    started: Instant,
}

/// Opens the request's stream. A connection that went away under us (GOAWAY, closed) is safe
/// to replace, since nothing of this request was sent on it; with no body to send, the head
/// is awaited here too, so that a stream the server never processed (refused, or beyond its
/// GOAWAY) is tried again on a fresh connection (RFC 9113 §8.7).
async fn open_stream<'a>(
    t: &Target<'a>,
    request: &http::Request<()>,
    end_of_stream: bool,
    ex: &mut Exchange,
) -> Result<Opened<'a>, ProxyError> {
    let upstream = t.upstream;
    let attempts = upstream.retry.attempts.max(2);
    let mut tried = Tried::default();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let (idx, lease, in_flight) = acquire_h2(t, &mut tried).await?;
        let server = &t.targets.servers[idx];
        ex.upstream = Some(server.address);
        let started = Instant::now();
        let ready = tokio::time::timeout(t.timeouts.connect, lease.send.clone().ready()).await;
        let sent = match ready {
            Ok(Ok(mut sender)) => sender.send_request(request.clone(), end_of_stream),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                lease.retire();
                upstream.metrics.error(UpstreamErrorKind::Timeout);
                return Err(ProxyError::Upstream(UpstreamErrorKind::Timeout));
            }
        };
        let (response, send) = match sent {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(server = %server.address, error = %e, "HTTP/2 upstream refused a stream");
                lease.retire();
                upstream.metrics.error(UpstreamErrorKind::Reset);
                if tries >= attempts {
                    return Err(ProxyError::Upstream(UpstreamErrorKind::Reset));
                }
                continue;
            }
        };
        let head = if end_of_stream {
            let waited = tokio::time::timeout(t.timeouts.response_header, response).await;
            if let Ok(Err(e)) = &waited {
                let unprocessed = e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM);
                if unprocessed && tries < attempts {
                    tracing::debug!(server = %server.address, error = %e, "HTTP/2 stream not processed; trying again");
                    lease.retire();
                    continue;
                }
            }
            Head::Ready(waited)
        } else {
            Head::Pending(response)
        };
        return Ok(Opened {
            server,
            _lease: lease,
            _in_flight: in_flight,
            head,
            send,
            started,
        });
    }
}

/// The response head, its failure counted against the server, its success recorded.
async fn response_head(
    t: &Target<'_>,
    head: Head,
    server: &Server,
    started: Instant,
) -> Result<http::Response<RecvStream>, ProxyError> {
    let upstream = t.upstream;
    let waited = match head {
        Head::Ready(r) => r,
        Head::Pending(pending) => tokio::time::timeout(t.timeouts.response_header, pending).await,
    };
    let kind = match waited {
        Ok(Ok(response)) => {
            let rtt = started.elapsed();
            let status = response.status().as_u16();
            if status >= 500 && upstream.outlier.count_5xx {
                server_failed(
                    upstream,
                    t.targets,
                    server,
                    UpstreamFailure::Status(status),
                    rtt,
                );
            } else {
                server.state.record_success(rtt, now_ns());
            }
            return Ok(response);
        }
        Ok(Err(e)) if e.is_go_away() || e.is_io() => UpstreamErrorKind::ClosedEarly,
        Ok(Err(_)) => UpstreamErrorKind::Reset,
        Err(_) => UpstreamErrorKind::Timeout,
    };
    upstream.metrics.error(kind);
    server_failed(
        upstream,
        t.targets,
        server,
        UpstreamFailure::Io(kind),
        started.elapsed(),
    );
    Err(ProxyError::Upstream(kind))
}

/// From an HTTP/2 client: the two bodies move at the same time, each with its trailers.
pub(super) async fn forward_h2(
    s: &Stream<'_>,
    respond: &mut SendResponse<Bytes>,
    body: &mut RecvStream,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    let (head, route, upstream) = (s.head, s.route, s.upstream);
    if head.upgrade.is_some() {
        return Err(ProxyError::Head(NO_TUNNEL));
    }
    if let Framing::Length(n) = head.framing {
        if n > route.max_body_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
    }
    let targets = upstream.targets.load_full();
    let t = Target {
        upstream,
        shared: s.shared,
        targets: &targets,
        pick: super::acquire::pick_request(upstream, head, s.conn.peer),
        timeouts: route.upstream_timeouts.unwrap_or(upstream.timeouts),
    };
    let request = translate::upstream_request(
        head,
        &s.parts.headers,
        &translate::Forwarded {
            client_ip: &s.conn.peer_ip,
            https: s.conn.tls,
            subject: s.conn.subject.as_ref(),
        },
    )
    .map_err(ProxyError::Head)?;
    let end_of_stream = body.is_end_stream();
    upstream.live.budget.deposit(upstream.retry.budget_ratio);
    let started = Instant::now();
    let opened = tokio::select! {
        opened = open_stream(&t, &request, end_of_stream, ex) => opened?,
        () = client_reset(respond) => return Err(ProxyError::ClientGone),
    };
    let Opened {
        server,
        _lease,
        _in_flight,
        head: up_head,
        send: mut up_send,
        started: try_started,
    } = opened;

    let upload = async {
        if end_of_stream {
            return Ok(());
        }
        upload_h2(body, &mut up_send, route, s.send_timeout).await
    };
    let download = async {
        let response = tokio::select! {
            r = response_head(&t, up_head, server, try_started) => r?,
            () = client_reset(respond) => return Err(ProxyError::ClientGone),
        };
        let status = response.status().as_u16();
        let (parts, mut up_body) = response.into_parts();
        let mut res = translate::response_from_h2(http::Response::from_parts(parts, ()));
        sticky_cookie(&mut res, upstream, t.pick.sticky, server);
        ex.status = status;
        ex.response_started = true;
        let empty = up_body.is_end_stream();
        let mut send = respond
            .send_response(res, empty)
            .map_err(|_| ProxyError::ClientGone)?;
        if empty {
            ex.response_done = true;
            return Ok(());
        }
        loop {
            match deadline::limit(t.timeouts.read, up_body.data()).await {
                Ok(Some(Ok(data))) => {
                    let n = data.len();
                    if send_all(&mut send, data, s.send_timeout, s.conn)
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                    ex.bytes_sent += n as u64;
                    let _ = up_body.flow_control().release_capacity(n);
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "HTTP/2 upstream response body failed");
                    upstream.metrics.error(UpstreamErrorKind::Reset);
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Ok(());
                }
                Err(_) => {
                    upstream.metrics.error(UpstreamErrorKind::Timeout);
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Ok(());
                }
            }
        }
        let ended = match deadline::limit(t.timeouts.read, up_body.trailers()).await {
            Ok(Ok(Some(mut trailers))) => {
                translate::strip_connection_specific(&mut trailers);
                send.send_trailers(trailers)
            }
            Ok(Ok(None)) => send.send_data(Bytes::new(), true),
            Ok(Err(_)) | Err(_) => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return Ok(());
            }
        };
        if ended.is_ok() {
            ex.response_done = true;
        }
        Ok(())
    };
    tokio::pin!(upload);
    tokio::pin!(download);
    let mut uploading = !end_of_stream;
    let result = loop {
        tokio::select! {
            sent = &mut upload, if uploading => {
                uploading = false;
                if let Err(e) = sent {
                    // The client's body failed: the upstream must not take a partial one
                    // for a whole one (upload_h2 reset its stream).
                    break Err(e);
                }
            }
            done = &mut download => break done,
        }
    };
    // If the response ended first (a server may answer before reading everything), the rest
    // of the request is not wanted: the upload stops here, and its stream is reset when
    // `up_send` goes.
    ex.upstream_time = Some(started.elapsed());
    result
}

/// Sends `data` on an upstream stream as its window allows.
async fn send_upstream(
    up_send: &mut SendStream<Bytes>,
    mut data: Bytes,
    timeout: Duration,
) -> Result<(), ProxyError> {
    while !data.is_empty() {
        up_send.reserve_capacity(data.len());
        let granted = tokio::time::timeout(
            timeout,
            std::future::poll_fn(|cx| up_send.poll_capacity(cx)),
        )
        .await;
        match granted {
            Ok(Some(Ok(k))) => {
                let k = k.min(data.len());
                if k > 0 && up_send.send_data(data.split_to(k), false).is_err() {
                    return Err(ProxyError::Upstream(UpstreamErrorKind::Reset));
                }
            }
            Ok(Some(Err(_)) | None) => return Err(ProxyError::Upstream(UpstreamErrorKind::Reset)),
            Err(_) => {
                up_send.send_reset(h2::Reason::CANCEL);
                return Err(ProxyError::Upstream(UpstreamErrorKind::Timeout));
            }
        }
    }
    Ok(())
}

/// Relays the client's DATA and trailers to the upstream stream, each side's window
/// respected: the client's capacity is released only once the upstream took the bytes.
async fn upload_h2(
    body: &mut RecvStream,
    up_send: &mut SendStream<Bytes>,
    route: &Route,
    send_timeout: Duration,
) -> Result<(), ProxyError> {
    let mut total = 0u64;
    loop {
        match deadline::limit(route.client_body_timeout, body.data()).await {
            Err(_) => {
                up_send.send_reset(h2::Reason::CANCEL);
                return Err(ProxyError::ClientTimeout);
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                up_send.send_reset(h2::Reason::CANCEL);
                return Err(ProxyError::ClientGone);
            }
            Ok(Some(Ok(chunk))) => {
                let n = chunk.len();
                total += n as u64;
                if total > route.max_body_bytes {
                    up_send.send_reset(h2::Reason::CANCEL);
                    return Err(ProxyError::BodyTooLarge);
                }
                send_upstream(up_send, chunk, send_timeout).await?;
                let _ = body.flow_control().release_capacity(n);
            }
        }
    }
    let trailers = match deadline::limit(route.client_body_timeout, body.trailers()).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Err(ProxyError::ClientGone),
        Err(_) => return Err(ProxyError::ClientTimeout),
    };
    let ended = match trailers {
        Some(mut map) => {
            translate::strip_connection_specific(&mut map);
            up_send.send_trailers(map)
        }
        None => up_send.send_data(Bytes::new(), true),
    };
    ended.map_err(|_| ProxyError::Upstream(UpstreamErrorKind::Reset))
}

/// The fields of an HTTP/1.1 request head as an HTTP/2 header map: hop-by-hop ones out (the
/// parser marked them), names lower-cased, X-Forwarded-For kept for `upstream_request` to
/// extend.
fn h1_fields(head: &RequestHead) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(head.fields.len());
    for f in &head.fields {
        match f.kind {
            FieldKind::Pass | FieldKind::Via | FieldKind::XForwardedFor => {}
            FieldKind::ContentLength => {}
            FieldKind::Host | FieldKind::XForwardedOther | FieldKind::Drop => continue,
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(head.bytes(f.name)),
            HeaderValue::from_bytes(head.bytes(f.value)),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// From an HTTP/1.1 client: the request body streams up (decoded from its HTTP/1.1 framing),
/// then the response streams back re-framed for HTTP/1.1.
pub(super) async fn forward_from_h1(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    upstream: &Upstream,
    shared: &Shared,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    if head.upgrade.is_some() {
        return Err(ProxyError::Head(NO_TUNNEL));
    }
    let targets = upstream.targets.load_full();
    let t = Target {
        upstream,
        shared,
        targets: &targets,
        pick: super::acquire::pick_request(upstream, head, client.peer),
        timeouts: route.upstream_timeouts.unwrap_or(upstream.timeouts),
    };
    let peer_ip = std::sync::Arc::clone(&client.peer_ip);
    let subject = client.subject.clone();
    let request = translate::upstream_request(
        head,
        &h1_fields(head),
        &translate::Forwarded {
            client_ip: &peer_ip,
            https: client.stream.is_tls(),
            subject: subject.as_ref(),
        },
    )
    .map_err(ProxyError::Head)?;
    let end_of_stream = !head.has_body();
    upstream.live.budget.deposit(upstream.retry.budget_ratio);
    let started = Instant::now();
    let Opened {
        server,
        _lease,
        _in_flight,
        head: up_head,
        send: mut up_send,
        started: try_started,
    } = open_stream(&t, &request, end_of_stream, ex).await?;

    if !end_of_stream {
        if head.expect_continue {
            client
                .stream
                .write_all(write::CONTINUE_100)
                .await
                .map_err(|_| ProxyError::ClientGone)?;
        }
        upload_from_h1(client, head, route, &mut up_send, t.timeouts.write).await?;
    }
    ex.request_done = true;

    let response = response_head(&t, up_head, server, try_started).await?;
    let (parts, mut up_body) = response.into_parts();
    let status = parts.status.as_u16();
    let bodiless = head.method == Method::Head || matches!(status, 204 | 304);
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| crate::http1::parse_content_length(v.as_bytes()));
    let upstream_framing = match (bodiless || up_body.is_end_stream(), length) {
        (true, _) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Chunked,
    };
    let (framing, persistence) = plan_response(head, upstream_framing, shared, ex);
    translate::write_h1_response(
        &mut client.out,
        &parts,
        framing,
        persistence,
        bodiless.then_some(length).flatten(),
    );
    if let Some(cookie) = &upstream.balance.sticky_cookie {
        if t.pick.sticky != Some(server.sticky_id) {
            let value = server.sticky_value();
            write::append_field(
                &mut client.out,
                b"Set-Cookie",
                &[cookie.as_bytes(), b"=", &value, b"; Path=/; HttpOnly"],
            );
        }
    }
    ex.status = status;
    ex.response_started = true;
    ex.close_announced = persistence == Persistence::Close;
    let encoder = Encoder::new(framing);
    let write_timeout = route.client_body_timeout;
    let mut failed = false;
    if framing != Framing::Empty {
        loop {
            match deadline::limit(t.timeouts.read, up_body.data()).await {
                Ok(Some(Ok(data))) => {
                    let n = data.len();
                    let wrote = deadline::limit(
                        write_timeout,
                        encoder.write(&mut client.stream, &mut client.out, &data),
                    )
                    .await;
                    if !matches!(wrote, Ok(Ok(()))) {
                        failed = true;
                        break;
                    }
                    ex.bytes_sent += n as u64;
                    let _ = up_body.flow_control().release_capacity(n);
                }
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => {
                    upstream.metrics.error(UpstreamErrorKind::Reset);
                    failed = true;
                    break;
                }
            }
        }
    }
    if !failed {
        // HTTP/1.1 clients get no trailers: they rarely ask, and RFC 9112 §7.1.2 lets us drop
        // them.
        let finished = deadline::limit(
            write_timeout,
            encoder.finish(&mut client.stream, &mut client.out),
        )
        .await;
        if matches!(finished, Ok(Ok(()))) {
            ex.response_done = true;
        }
    } else {
        // The head is out: closing is the only signal left.
        ex.close_announced = true;
    }
    ex.upstream_time = Some(started.elapsed());
    Ok(())
}

/// Decodes an HTTP/1.1 request body from the client and sends it on the upstream stream,
/// trailers included.
async fn upload_from_h1(
    client: &mut Client,
    head: &RequestHead,
    route: &Route,
    up_send: &mut SendStream<Bytes>,
    timeout: Duration,
) -> Result<(), ProxyError> {
    let mut decoder = Decoder::new(head.framing);
    decoder.keep_trailers();
    let mut total = 0u64;
    let mut eof = false;
    loop {
        match decoder.decode(&mut client.buf, eof) {
            Ok(Decoded::Data(data)) => {
                total += data.len() as u64;
                if total > route.max_body_bytes {
                    up_send.send_reset(h2::Reason::CANCEL);
                    return Err(ProxyError::BodyTooLarge);
                }
                send_upstream(up_send, data, timeout).await?;
            }
            Ok(Decoded::NeedMore) => {
                if client.buf.capacity() - client.buf.len() < body::READ_CHUNK / 4 {
                    client.buf.reserve(body::READ_CHUNK);
                }
                match deadline::limit(
                    route.client_body_timeout,
                    client.stream.read_buf(&mut client.buf),
                )
                .await
                {
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => {
                        up_send.send_reset(h2::Reason::CANCEL);
                        return Err(ProxyError::ClientGone);
                    }
                    Err(_) => {
                        up_send.send_reset(h2::Reason::CANCEL);
                        return Err(ProxyError::ClientTimeout);
                    }
                }
            }
            Ok(Decoded::Done) => break,
            Err(e) => {
                up_send.send_reset(h2::Reason::CANCEL);
                return Err(match e {
                    body::RelayError::Malformed(what) => ProxyError::ClientBody(what),
                    body::RelayError::TooLarge => ProxyError::BodyTooLarge,
                    _ => ProxyError::ClientGone,
                });
            }
        }
    }
    let ended = match decoder.take_trailers() {
        Some(block) => up_send.send_trailers(translate::trailers_from_h1(&block)),
        None => up_send.send_data(Bytes::new(), true),
    };
    ended.map_err(|_| ProxyError::Upstream(UpstreamErrorKind::Reset))
}
