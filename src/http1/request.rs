//! Parses and validates a client's request head.
//!
//! Anything ambiguous is refused here, before a route is looked up, so an ambiguous message can
//! never reach an upstream: both Content-Length and Transfer-Encoding, differing or malformed
//! Content-Length, codings we cannot frame, obs-fold, bare CR/LF, NUL, bad or repeated Host.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use super::{
    classify, has_bare_lf, list_elements, parse_content_length, trim_ows, Field, FieldKind,
    Framing, Span, Version,
};
use crate::config::snapshot::ConnLimits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Patch,
    Connect,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"TRACE" => Method::Trace,
            b"PATCH" => Method::Patch,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// RFC 9110 §9.2.2: a request with an idempotent method may be sent again after a failure.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// Why a request head was refused; `proxy::error` maps each to its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request header fields too large")]
    HeaderTooLarge,
    #[error("request target too long")]
    UriTooLong,
    #[error("transfer coding not implemented")]
    UnsupportedCoding,
    #[error("expectation not supported")]
    UnsupportedExpectation,
}

/// A request head as received, with the facts the proxy needs already derived from it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The head's bytes as received, up to and including the blank line.
    pub raw: Bytes,
    pub method: Method,
    pub method_span: Span,
    /// The request target as received.
    pub target: Span,
    /// The path the router matches and the upstream receives: origin-form, with the query.
    pub path_and_query: Span,
    /// The path alone, without the query.
    pub path: Span,
    pub version: Version,
    pub fields: Vec<Field>,
    /// The authority the request is for: the absolute-form target's, or else the Host field's.
    pub host: Span,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// The `Upgrade` field's value when the client asks to switch protocols (RFC 9110 §7.8) to
    /// something we can tunnel, such as WebSocket: `Connection: upgrade`, HTTP/1.1, no body,
    /// and not `h2c`, which is never passed upstream (we would have to speak HTTP/2 ourselves).
    pub upgrade: Option<Span>,
}

impl RequestHead {
    pub fn bytes(&self, span: Span) -> &[u8] {
        span.get(&self.raw)
    }

    /// The host for routing: without port, lower-cased (borrowed when already lower-case).
    pub fn route_host(&self) -> std::borrow::Cow<'_, str> {
        let host = self.bytes(self.host);
        let host = match host.first() {
            // IP literal: keep the brackets, drop the port.
            Some(b'[') => match memchr::memchr(b']', host) {
                Some(end) => &host[..=end],
                None => host,
            },
            _ => match memchr::memrchr(b':', host) {
                Some(colon) => &host[..colon],
                None => host,
            },
        };
        // Host was validated to be ASCII, so this cannot fail; an empty host routes as "no host".
        let host = std::str::from_utf8(host).unwrap_or_default();
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(host.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(host)
        }
    }

    /// The value of the first field named `name` (compared without case).
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| self.bytes(f.name).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| self.bytes(f.value))
    }

    /// The value of the cookie `name` from the Cookie fields (RFC 6265 §5.4: `a=1; b=2`, and a
    /// client may send several Cookie fields).
    pub fn cookie(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .filter(|f| self.bytes(f.name).eq_ignore_ascii_case(b"cookie"))
            .flat_map(|f| self.bytes(f.value).split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = memchr::memchr(b'=', pair)?;
                (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            })
    }

    pub fn has_body(&self) -> bool {
        !matches!(self.framing, Framing::Empty | Framing::Length(0))
    }
}

/// Looks for a complete head at the start of `buf`. `Ok(None)`: need more bytes. On success the
/// head's bytes are split off `buf`; what follows (body, a pipelined request) stays in it.
pub fn parse(buf: &mut BytesMut, limits: &ConnLimits) -> Result<Option<RequestHead>, HeadError> {
    // Uninitialised slots: zeroing 128 headers (4 KiB) on every parse attempt showed in profiles.
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let max_headers = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut storage[..max_headers],
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return need_more_or_too_large(buf, limits);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeaderTooLarge),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed("unsupported HTTP version"))
        }
        Err(httparse::Error::HeaderName) => {
            return Err(HeadError::Malformed(
                "invalid header name or obsolete line folding",
            ))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed("invalid character in a header value"))
        }
        Err(httparse::Error::Token) => return Err(HeadError::Malformed("invalid method")),
        Err(_) => return Err(HeadError::Malformed("invalid request line")),
    };
    if head_len > limits.max_header_bytes {
        return Err(HeadError::HeaderTooLarge);
    }
    let base = &buf[..head_len];
    if has_bare_lf(base) {
        return Err(HeadError::Malformed("line not terminated by CRLF"));
    }
    let (Some(method), Some(target), version) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if target.len() > limits.max_uri_bytes {
        return Err(HeadError::UriTooLong);
    }
    let method_span = Span::of(base, method.as_bytes());
    let target_span = Span::of(base, target.as_bytes());
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        fields.push(Field {
            name: Span::of(base, name),
            value: Span::of(base, h.value),
            kind: classify(name),
        });
    }
    let mut head = RequestHead {
        method: Method::from_bytes(method.as_bytes()),
        method_span,
        target: target_span,
        path_and_query: target_span,
        path: target_span,
        version: Version::from_httparse(version),
        fields,
        host: Span::default(),
        framing: Framing::Empty,
        keep_alive: true,
        expect_continue: false,
        upgrade: None,
        raw: Bytes::new(),
    };
    validate(&mut head, base)?;
    head.raw = buf.split_to(head_len).freeze();
    Ok(Some(head))
}

fn need_more_or_too_large<T>(buf: &[u8], limits: &ConnLimits) -> Result<Option<T>, HeadError> {
    // Still inside the request line past the URI limit: the target is what is too long.
    let line_end = memchr::memchr(b'\n', buf);
    if line_end.is_none() && buf.len() > limits.max_uri_bytes + 32 {
        return Err(HeadError::UriTooLong);
    }
    if buf.len() > limits.max_header_bytes {
        return Err(HeadError::HeaderTooLarge);
    }
    Ok(None)
}

fn validate(head: &mut RequestHead, raw: &[u8]) -> Result<(), HeadError> {
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut saw_te = false;
    let mut host: Option<Span> = None;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_upgrade = false;
    let mut upgrade: Option<Span> = None;

    for field in &head.fields {
        let name = field.name.get(raw);
        let value = field.value.get(raw);
        match field.kind {
            FieldKind::ContentLength => {
                let n = parse_content_length(value)
                    .ok_or(HeadError::Malformed("invalid Content-Length"))?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length values"));
                }
                content_length = Some(n);
            }
            FieldKind::Host => {
                if host.is_some() {
                    return Err(HeadError::Malformed("more than one Host field"));
                }
                if !valid_authority(trim_ows(value)) {
                    return Err(HeadError::Malformed("invalid Host"));
                }
                host = Some(field.value);
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                // The only coding we can frame is chunked, and it must be the only one: re-framing
                // "gzip, chunked" would strip the gzip label the upstream needs.
                for coding in list_elements(value) {
                    if saw_te || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(if coding.eq_ignore_ascii_case(b"chunked") {
                            HeadError::Malformed("chunked applied more than once")
                        } else {
                            HeadError::UnsupportedCoding
                        });
                    }
                    saw_te = true;
                    chunked = true;
                }
                if !saw_te {
                    return Err(HeadError::Malformed("empty Transfer-Encoding"));
                }
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"connection") => {
                for token in list_elements(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        conn_upgrade = true;
                    }
                }
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"upgrade") => {
                // Two Upgrade fields would be two lists to merge; a client has no need for it.
                upgrade = if upgrade.is_some() {
                    return Err(HeadError::Malformed("more than one Upgrade field"));
                } else {
                    Some(field.value)
                };
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"expect") => {
                if trim_ows(value).eq_ignore_ascii_case(b"100-continue") {
                    head.expect_continue = true;
                } else {
                    return Err(HeadError::UnsupportedExpectation);
                }
            }
            _ => {}
        }
    }

    if saw_te && content_length.is_some() {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if saw_te && head.version == Version::Http10 {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is a sign of a faulty or hostile sender.
        return Err(HeadError::Malformed(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    head.framing = match (chunked, content_length) {
        (true, _) => Framing::Chunked,
        (false, Some(0)) | (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    head.keep_alive = match head.version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };
    head.upgrade = upgrade.filter(|value| {
        conn_upgrade
            && head.version == Version::Http11
            && head.framing == Framing::Empty
            && !value.is_empty()
            && list_elements(value.get(raw))
                .all(|p| !p.is_empty() && !p.eq_ignore_ascii_case(b"h2c"))
    });

    // Drop the fields that Connection names (RFC 9110 §7.6.1); they are for this hop only.
    let connection_values: Vec<Span> = head
        .fields
        .iter()
        .filter(|f| {
            f.kind == FieldKind::Drop && f.name.get(raw).eq_ignore_ascii_case(b"connection")
        })
        .map(|f| f.value)
        .collect();
    for value in connection_values {
        for token in list_elements(value.get(raw)) {
            for f in head.fields.iter_mut() {
                if f.name.get(raw).eq_ignore_ascii_case(token) && f.kind != FieldKind::Host {
                    f.kind = FieldKind::Drop;
                }
            }
        }
    }

    let target = head.target.get(raw);
    match target.first() {
        Some(b'/') => {}
        Some(b'*') if target.len() == 1 && head.method == Method::Options => {}
        _ if head.method == Method::Connect => {
            return Err(HeadError::Malformed("CONNECT is not supported"));
        }
        _ => {
            // Absolute-form (RFC 9112 §3.2.2): the target's authority overrides Host.
            let rest =
                strip_scheme(target).ok_or(HeadError::Malformed("invalid request target"))?;
            let authority_len = rest
                .iter()
                .position(|&b| matches!(b, b'/' | b'?' | b'#'))
                .unwrap_or(rest.len());
            let authority = &rest[..authority_len];
            if authority.is_empty() || authority.contains(&b'@') || !valid_authority(authority) {
                return Err(HeadError::Malformed("invalid authority in request target"));
            }
            host = Some(Span::of(raw, authority));
            let path = &rest[authority_len..];
            if !path.starts_with(b"/") {
                return Err(HeadError::Malformed("absolute-form target without a path"));
            }
            head.path_and_query = Span::of(raw, path);
        }
    }
    let pq = head.path_and_query.get(raw);
    if pq.contains(&b'#') {
        return Err(HeadError::Malformed("fragment in request target"));
    }
    let path_len = memchr::memchr(b'?', pq).unwrap_or(pq.len());
    head.path = Span {
        start: head.path_and_query.start,
        end: head.path_and_query.start + path_len as u32,
    };

    match host {
        Some(h) => head.host = trim_span(raw, h),
        None if head.version == Version::Http11 => {
            return Err(HeadError::Malformed("missing Host"));
        }
        None => {}
    }
    Ok(())
}

fn trim_span(raw: &[u8], span: Span) -> Span {
    Span::of(raw, trim_ows(span.get(raw)))
}

fn strip_scheme(target: &[u8]) -> Option<&[u8]> {
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

/// `host[:port]` where host is a DNS-style name, an IPv4 address or a bracketed IPv6 literal.
/// Stricter than RFC 3986's reg-name on purpose: the value is echoed to upstreams and logs.
fn valid_authority(value: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = value.strip_prefix(b"[") {
        let Some(end) = memchr::memchr(b']', rest) else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        (&b"x"[..], &rest[end + 1..])
    } else {
        match memchr::memchr(b':', value) {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    // An empty Host is allowed (RFC 9112 §3.2) and simply matches no host route.
    value.is_empty() || (host_ok && port_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnLimits = ConnLimits {
        max_header_bytes: 1024,
        max_headers: 16,
        max_uri_bytes: 64,
    };

    fn parse_str(s: &str) -> Result<Option<RequestHead>, HeadError> {
        let mut buf = BytesMut::from(s.as_bytes());
        parse(&mut buf, &LIMITS)
    }

    fn ok(s: &str) -> RequestHead {
        match parse_str(s) {
            Ok(Some(h)) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn malformed(s: &str) {
        assert!(
            matches!(parse_str(s), Err(HeadError::Malformed(_))),
            "{s:?}: {:?}",
            parse_str(s)
        );
    }

    #[test]
    fn simple_get() {
        let h = ok("GET /a/b?q=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.bytes(h.path), b"/a/b");
        assert_eq!(h.bytes(h.path_and_query), b"/a/b?q=1");
        assert_eq!(h.route_host(), "example.com");
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(matches!(
            parse_str("GET / HTTP/1.1\r\nHost: a\r\n"),
            Ok(None)
        ));
    }

    #[test]
    fn framing_and_keep_alive() {
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(!h.keep_alive);
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        let h = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        malformed(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        malformed("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5a\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n");
        malformed("POST / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n");
        malformed("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n");
        malformed("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n");
        malformed("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n");
        malformed("GET / HTTP/1.1\r\nHost: a b\r\n\r\n");
        malformed("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
        malformed("GET / HTTP/1.1\r\n\r\n");
        malformed("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(
            parse_str("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .err(),
            Some(HeadError::UnsupportedCoding)
        );
    }

    #[test]
    fn identical_content_lengths_are_one() {
        let h = ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn limits() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(100));
        assert_eq!(parse_str(&long).err(), Some(HeadError::UriTooLong));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(2000)
        );
        assert_eq!(parse_str(&big).err(), Some(HeadError::HeaderTooLarge));
        let many: String = (0..20).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(parse_str(&many).err(), Some(HeadError::HeaderTooLarge));
    }

    #[test]
    fn absolute_form_overrides_host() {
        let h = ok("GET http://App.example.com:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.route_host(), "app.example.com");
        assert_eq!(h.bytes(h.path_and_query), b"/x?y");
    }

    #[test]
    fn connection_named_fields_are_dropped() {
        let h = ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n");
        let f = h.fields.iter().find(|f| h.bytes(f.name) == b"X-Secret");
        assert_eq!(f.map(|f| f.kind), Some(FieldKind::Drop));
    }

    #[test]
    fn upgrades_are_recognised_only_when_they_can_be_tunnelled() {
        let upgrade = |text: &str| {
            let h = ok(text);
            h.upgrade
                .map(|u| String::from_utf8_lossy(h.bytes(u)).into_owned())
        };
        let ws = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(upgrade(ws).as_deref(), Some("websocket"));
        // Upgrade without the Connection token, h2c, HTTP/1.0, or a body: no tunnel.
        assert_eq!(
            upgrade("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"),
            None
        );
        assert_eq!(
            upgrade("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"),
            None
        );
        assert_eq!(
            upgrade(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo, h2c\r\n\r\n"
            ),
            None
        );
        assert_eq!(
            upgrade(
                "GET / HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            ),
            None
        );
        assert_eq!(
            upgrade("POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx"),
            None
        );
        malformed(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n",
        );
    }

    #[test]
    fn pipelined_bytes_stay_in_the_buffer() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2"[..]);
        let h = parse(&mut buf, &LIMITS).ok().flatten();
        assert!(h.is_some());
        assert_eq!(&buf[..], b"GET /2");
    }
}
