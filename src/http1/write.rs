//! Serializes heads into a connection's reusable output buffer.
//!
//! Forwarded fields are copied byte for byte from the received head; only what a proxy must change
//! is written anew: framing, the X-Forwarded-* fields, Via, Connection. Nothing here allocates
//! once the output buffer has grown to a typical head's size.

use std::cell::RefCell;
use std::time::{Duration, SystemTime};

use super::request::RequestHead;
use super::response::ResponseHead;
use super::{Field, FieldKind, Framing, Version};

/// Our pseudonym in `Via` (RFC 9110 §7.6.3).
const VIA: &[u8] = b"1.1 gatehouse";

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Adds a field to a head already finished in `out` (one that ends with the blank line), for
/// the rare fields only some responses carry: a sticky-session cookie, a Retry-After.
pub fn append_field(out: &mut Vec<u8>, name: &[u8], value: &[&[u8]]) {
    if !out.ends_with(b"\r\n\r\n") {
        return;
    }
    out.truncate(out.len() - 2);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for part in value {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n\r\n");
}

fn framing_field(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
}

/// What the proxy adds to a request it forwards.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The client's address as text, appended to X-Forwarded-For.
    pub client_ip: &'a [u8],
    /// "http" or "https", for X-Forwarded-Proto.
    pub proto: &'a [u8],
    /// The client certificate's subject header (lower-case) and value: any field of that name
    /// from the client is dropped, and the verified value, when there is one, sent instead.
    pub subject: Option<(&'a [u8], Option<&'a [u8]>)>,
}

/// The head sent upstream for `head`, whose body will be sent with `framing`.
pub fn request_head(out: &mut Vec<u8>, head: &RequestHead, fwd: Forwarded<'_>, framing: Framing) {
    let raw = &head.raw[..];
    out.clear();
    // One allocation for a typical head instead of a series of doublings from zero (the buffer
    // is released while the connection idles).
    out.reserve(raw.len() + 256);
    out.extend_from_slice(head.bytes(head.method_span));
    out.push(b' ');
    out.extend_from_slice(head.bytes(head.path_and_query));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Host as the client gave it (or the absolute-form target's authority, RFC 9112 §3.2.2).
    let host = head.bytes(head.host);
    if !host.is_empty() {
        field(out, b"Host", host);
    }
    let mut had_xff = false;
    let mut had_content_length = false;
    for f in &head.fields {
        match f.kind {
            FieldKind::Pass
                if fwd
                    .subject
                    .is_some_and(|(name, _)| f.name.get(raw).eq_ignore_ascii_case(name)) => {}
            FieldKind::Pass | FieldKind::Via => copy(out, raw, f),
            FieldKind::XForwardedFor => had_xff = true,
            FieldKind::ContentLength => had_content_length = true,
            FieldKind::Host | FieldKind::XForwardedOther | FieldKind::Drop => {}
        }
    }
    if let Some(upgrade) = head.upgrade {
        // The switch is asked of the next hop again: Connection and Upgrade are hop-by-hop.
        out.extend_from_slice(b"Connection: upgrade\r\n");
        field(out, b"Upgrade", upgrade.get(raw));
    }
    // One X-Forwarded-For line with the client appended: several lines would be joined
    // differently by different upstream frameworks, and some read only the first.
    out.extend_from_slice(b"X-Forwarded-For: ");
    if had_xff {
        for f in head
            .fields
            .iter()
            .filter(|f| f.kind == FieldKind::XForwardedFor)
        {
            out.extend_from_slice(f.value.get(raw));
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(fwd.client_ip);
    out.extend_from_slice(b"\r\n");
    field(out, b"X-Forwarded-Proto", fwd.proto);
    if !host.is_empty() {
        field(out, b"X-Forwarded-Host", host);
    }
    if let Some((name, Some(value))) = fwd.subject {
        field(out, name, value);
    }
    field(out, b"Via", VIA);
    match framing {
        // A declared empty body stays declared: some servers insist on Content-Length for POST.
        Framing::Empty if had_content_length => out.extend_from_slice(b"Content-Length: 0\r\n"),
        other => framing_field(out, other),
    }
    out.extend_from_slice(b"\r\n");
}

fn copy(out: &mut Vec<u8>, raw: &[u8], f: &Field) {
    field(out, f.name.get(raw), f.value.get(raw));
}

/// How the response to the client ends its connection handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1 default: nothing to say.
    KeepAlive,
    /// An HTTP/1.0 client that asked for keep-alive must be told it got it.
    KeepAlive10,
    Close,
}

/// The head sent to the client for an upstream's `head`, with the body sent as `framing`.
pub fn response_head(
    out: &mut Vec<u8>,
    head: &ResponseHead,
    framing: Framing,
    persistence: Persistence,
) {
    let raw = &head.raw[..];
    out.clear();
    out.reserve(raw.len() + 128);
    status_line(out, head.status, head.bytes(head.reason));
    for f in &head.fields {
        match f.kind {
            FieldKind::Drop => {}
            // For a bodiless response (HEAD, 304) Content-Length describes the representation.
            FieldKind::ContentLength => {
                if framing == Framing::Empty && head.status != 204 && !head.is_informational() {
                    copy(out, raw, f);
                }
            }
            _ => copy(out, raw, f),
        }
    }
    field(out, b"Via", VIA);
    if !head.is_informational() {
        framing_field(out, framing);
        persistence_field(out, persistence);
    }
    out.extend_from_slice(b"\r\n");
}

/// A 101 (Switching Protocols) for the client: the upstream's fields, and its Upgrade value
/// with `Connection: upgrade`, both hop-by-hop and so written anew.
pub fn switching_protocols(out: &mut Vec<u8>, head: &ResponseHead) {
    let raw = &head.raw[..];
    out.clear();
    out.reserve(raw.len() + 64);
    status_line(out, head.status, head.bytes(head.reason));
    let mut upgrade = None;
    for f in &head.fields {
        match f.kind {
            FieldKind::Drop if f.name.get(raw).eq_ignore_ascii_case(b"upgrade") => {
                upgrade = Some(f.value.get(raw));
            }
            FieldKind::Drop | FieldKind::ContentLength => {}
            _ => copy(out, raw, f),
        }
    }
    field(out, b"Via", VIA);
    out.extend_from_slice(b"Connection: upgrade\r\n");
    if let Some(value) = upgrade {
        field(out, b"Upgrade", value);
    }
    out.extend_from_slice(b"\r\n");
}

fn persistence_field(out: &mut Vec<u8>, persistence: Persistence) {
    match persistence {
        Persistence::KeepAlive => {}
        Persistence::KeepAlive10 => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        Persistence::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// A response Gatehouse makes itself (a `respond` route, an error): Date and Server included,
/// as an origin server must (RFC 9110 §6.6.1).
pub fn local_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &[u8],
    body_len: usize,
    persistence: Persistence,
) {
    out.clear();
    out.reserve(256);
    status_line(out, status, reason(status).as_bytes());
    out.extend_from_slice(b"Server: gatehouse\r\n");
    with_date(|date| field(out, b"Date", date));
    if body_len > 0 || !matches!(status, 204 | 304) {
        field(out, b"Content-Type", content_type);
        framing_field(out, Framing::Length(body_len as u64));
    }
    persistence_field(out, persistence);
    out.extend_from_slice(b"\r\n");
}

pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub fn persistence_for(version: Version, keep_alive: bool) -> Persistence {
    match (keep_alive, version) {
        (false, _) => Persistence::Close,
        (true, Version::Http11) => Persistence::KeepAlive,
        (true, Version::Http10) => Persistence::KeepAlive10,
    }
}

thread_local! {
    /// The Date value, formatted at most once a second per thread.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            }
        }
        f(&cached.1);
    });
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::ConnLimits;
    use bytes::BytesMut;

    fn req(s: &str) -> RequestHead {
        let limits = ConnLimits {
            max_header_bytes: 4096,
            max_headers: 64,
            max_uri_bytes: 1024,
        };
        match super::super::request::parse(&mut BytesMut::from(s.as_bytes()), &limits) {
            Ok(Some(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forwarded_request_strips_hop_by_hop_and_adds_forwarding_fields() {
        let h = req("POST /x?y HTTP/1.1\r\nHost: app.example.com\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n\r\n");
        let mut out = Vec::new();
        let fwd = Forwarded {
            client_ip: b"127.0.0.1",
            proto: b"http",
            subject: None,
        };
        request_head(&mut out, &h, fwd, Framing::Chunked);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "POST /x?y HTTP/1.1\r\nHost: app.example.com\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4, 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: app.example.com\r\nVia: 1.1 gatehouse\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn a_forged_subject_header_is_dropped_and_the_verified_one_sent() {
        let h = req("GET / HTTP/1.1\r\nHost: a\r\nX-Client-Subject: CN=forged\r\nx-client-subject: CN=again\r\n\r\n");
        let mut out = Vec::new();
        for (value, want) in [
            (
                Some(&b"CN=alice"[..]),
                "X-Forwarded-Host: a\r\nx-client-subject: CN=alice\r\nVia",
            ),
            (None, "X-Forwarded-Host: a\r\nVia"),
        ] {
            let fwd = Forwarded {
                client_ip: b"127.0.0.1",
                proto: b"https",
                subject: Some((b"x-client-subject", value)),
            };
            request_head(&mut out, &h, fwd, Framing::Empty);
            let text = String::from_utf8(out.clone()).unwrap();
            assert!(
                !text.contains("forged") && !text.contains("again"),
                "{text}"
            );
            assert!(text.contains(want), "{text}");
        }
    }

    #[test]
    fn local_response_has_length_and_date() {
        let mut out = Vec::new();
        local_response(&mut out, 404, b"text/plain", 10, Persistence::Close);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("\r\nContent-Length: 10\r\n"));
        assert!(text.contains("\r\nDate: "));
        assert!(text.ends_with("Connection: close\r\n\r\n"));
    }
}
