//! Between HTTP/2 messages and the rest of Gatehouse (RFC 9113 §8).
//!
//! Neighbours: `proxy::h2` calls these for every HTTP/2 stream. A request becomes an HTTP/1.1
//! head in bytes and is parsed by `http1::request`, so that routing, balancing, header
//! forwarding and every validation rule are the HTTP/1.1 ones, written once: `:authority`
//! becomes `Host`, `:method` and `:path` the request line, the `cookie` fields one field joined
//! with "; " (§8.2.3), and a body without a content-length is framed as chunked. Responses go
//! the other way: an HTTP/1.1 upstream's head becomes an `http::Response`, its connection-specific
//! fields dropped (§8.2.2), its trailers kept for the client.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::snapshot::ConnLimits;
use crate::http1::request::{self, HeadError, RequestHead};
use crate::http1::response::{BadResponse, ResponseHead};
use crate::http1::FieldKind;
#[cfg(test)]
use crate::http1::Framing;

/// Our pseudonym in `Via` (RFC 9110 §7.6.3) for what we relay from an HTTP/1.1 upstream.
const VIA_H1: &str = "1.1 gatehouse";
/// ... and from an HTTP/2 one.
const VIA_H2: &str = "2 gatehouse";

/// Fields that are about one connection (RFC 9113 §8.2.2): malformed in an HTTP/2 request,
/// never sent in an HTTP/2 response.
fn is_connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// What is known of an HTTP/2 request's body when its HTTP/1.1 head is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKnown {
    /// The HEADERS frame ended the stream.
    None,
    /// The whole body has arrived: this many bytes.
    Whole(u64),
    /// Still arriving: its content-length if the client gave one, else chunked.
    Streaming,
}

/// The HTTP/1.1 head that stands for an HTTP/2 request.
pub fn request_head(
    parts: &http::request::Parts,
    body: BodyKnown,
    limits: &ConnLimits,
) -> Result<RequestHead, HeadError> {
    // RFC 8441 §4: an extended CONNECT with `:protocol = websocket` is a WebSocket opening
    // handshake, which an HTTP/1.1 upstream takes as the RFC 6455 Upgrade request.
    let websocket = if parts.method == http::Method::CONNECT {
        match parts.extensions.get::<h2::ext::Protocol>() {
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => true,
            Some(_) => return Err(HeadError::Malformed("unsupported :protocol")),
            None => return Err(HeadError::Malformed("CONNECT is not supported over HTTP/2")),
        }
    } else {
        false
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    if target.is_empty() {
        return Err(HeadError::Malformed("empty :path"));
    }
    let mut buf = BytesMut::with_capacity(256 + parts.headers.len() * 32);
    let method = if websocket {
        "GET"
    } else {
        parts.method.as_str()
    };
    buf.extend_from_slice(method.as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(target);
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    // RFC 9113 §8.3.1: `:authority` wins; a Host that names another origin is malformed.
    match parts.uri.authority() {
        Some(authority) => {
            let a = authority.as_str().as_bytes();
            if parts
                .headers
                .get_all(header::HOST)
                .iter()
                .any(|h| !h.as_bytes().eq_ignore_ascii_case(a))
            {
                return Err(HeadError::Malformed("Host differs from :authority"));
            }
            field(&mut buf, b"host", a);
        }
        None => {
            for h in parts.headers.get_all(header::HOST) {
                field(&mut buf, b"host", h.as_bytes());
            }
        }
    }
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let Some(first) = cookies.next() {
        buf.extend_from_slice(b"cookie: ");
        buf.extend_from_slice(first.as_bytes());
        for more in cookies {
            buf.extend_from_slice(b"; ");
            buf.extend_from_slice(more.as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if name == header::HOST || name == header::COOKIE {
            continue;
        }
        if name == header::CONTENT_LENGTH && matches!(body, BodyKnown::Whole(_)) {
            // Written below from what arrived (h2 has checked that the two agree).
            continue;
        }
        // h2 refuses these already (as a stream error); checked again so that nothing here
        // depends on that.
        if is_connection_specific(name) {
            return Err(HeadError::Malformed("connection-specific header field"));
        }
        if name == header::TE {
            if value.as_bytes().eq_ignore_ascii_case(b"trailers") {
                continue;
            }
            return Err(HeadError::Malformed("TE other than \"trailers\""));
        }
        field(&mut buf, name.as_str().as_bytes(), value.as_bytes());
    }
    if websocket {
        // The stream's DATA is the tunnel, not a body. The key is ours: RFC 8441 §5 drops it
        // from HTTP/2, and the upstream's answer to it is checked by no one but us.
        buf.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n");
        field(&mut buf, b"sec-websocket-key", &websocket_key());
    } else {
        match body {
            BodyKnown::None => {}
            BodyKnown::Whole(n) => field(
                &mut buf,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            ),
            BodyKnown::Streaming if !parts.headers.contains_key(header::CONTENT_LENGTH) => {
                buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            BodyKnown::Streaming => {}
        }
    }
    buf.extend_from_slice(b"\r\n");
    match request::parse(&mut buf, limits)? {
        Some(head) => Ok(head),
        None => Err(HeadError::Malformed("incomplete request")),
    }
}

/// A fresh Sec-WebSocket-Key: 16 random bytes in base64 (RFC 6455 §4.1).
fn websocket_key() -> [u8; 24] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut raw = [0u8; 18];
    for b in raw.iter_mut().take(16) {
        *b = fastrand::u8(..);
    }
    let mut out = [b'='; 24];
    for (i, chunk) in raw.chunks(3).enumerate() {
        let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for j in 0..4 {
            out[i * 4 + j] = ALPHABET[(n >> (18 - 6 * j) & 63) as usize];
        }
    }
    // 16 bytes are 22 characters and two of padding.
    out[22] = b'=';
    out[23] = b'=';
    out
}

fn field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// The HTTP/2 response for an HTTP/1.1 upstream's head. `length_known`: the body is relayed
/// as the upstream framed it by length (or is empty), so its Content-Length stays true.
pub fn response_from_h1(
    head: &ResponseHead,
    length_known: bool,
) -> Result<http::Response<()>, BadResponse> {
    let mut response = http::Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(head.status).map_err(|_| BadResponse("invalid status code"))?;
    let headers = response.headers_mut();
    for f in &head.fields {
        match f.kind {
            // Hop-by-hop, and the fields Connection names (marked so by the parser).
            FieldKind::Drop => continue,
            FieldKind::ContentLength if !length_known => continue,
            _ => {}
        }
        let name = HeaderName::from_bytes(head.bytes(f.name))
            .map_err(|_| BadResponse("invalid header name"))?;
        let value = HeaderValue::from_bytes(head.bytes(f.value))
            .map_err(|_| BadResponse("invalid header value"))?;
        headers.append(name, value);
    }
    headers.append(header::VIA, HeaderValue::from_static(VIA_H1));
    Ok(response)
}

/// An HTTP/2 upstream's response head, made fit for the client: connection-specific fields
/// out (a conforming upstream sends none), our Via in.
pub fn response_from_h2(mut response: http::Response<()>) -> http::Response<()> {
    strip_connection_specific(response.headers_mut());
    response
        .headers_mut()
        .append(header::VIA, HeaderValue::from_static(VIA_H2));
    response
}

/// Removes the fields RFC 9113 §8.2.2 forbids in HTTP/2, and the ones `Connection` names.
pub fn strip_connection_specific(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Trailer lines kept by the HTTP/1.1 body decoder (`name: value\r\n` each) as HTTP/2
/// trailers. Fields that cannot be carried, or that must not be trailers, are left out.
pub fn trailers_from_h1(block: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if is_connection_specific(&name) || name == header::CONTENT_LENGTH || name == header::TE {
            continue;
        }
        map.append(name, value);
    }
    map
}

/// The end of a chunked body carrying `trailers` (RFC 9112 §7.1.2), for an HTTP/1.1 upstream.
pub fn last_chunk_with_trailers(trailers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + trailers.len() * 32);
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        if is_connection_specific(name) || name == header::CONTENT_LENGTH || name == header::TE {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// What the proxy adds to a request it forwards over HTTP/2 (the HTTP/1.1 path writes the same
/// fields in `http1::write::request_head`).
pub struct Forwarded<'a> {
    pub client_ip: &'a [u8],
    pub https: bool,
    /// The client certificate's subject header (lower-case) and value: any field of that name
    /// from the client is dropped, and the verified value, when there is one, sent instead.
    pub subject: Option<&'a crate::conn::ClientSubject>,
}

/// The request sent to an HTTP/2 upstream for a client's request, with `head` the HTTP/1.1
/// view of it (which has been validated). The authority and fields are the client's, minus
/// the connection-specific ones; X-Forwarded-*, Via are ours. `te: trailers` stays: gRPC
/// needs it.
pub fn upstream_request(
    head: &RequestHead,
    headers: &HeaderMap,
    fwd: &Forwarded<'_>,
) -> Result<http::Request<()>, HeadError> {
    let host = head.bytes(head.host);
    let path = head.bytes(head.path_and_query);
    let mut uri = Vec::with_capacity(8 + host.len() + path.len());
    uri.extend_from_slice(b"http://");
    uri.extend_from_slice(host);
    uri.extend_from_slice(path);
    let uri =
        http::Uri::try_from(uri).map_err(|_| HeadError::Malformed("invalid request target"))?;
    let method = http::Method::from_bytes(head.bytes(head.method_span))
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let out = request.headers_mut();
    out.reserve(headers.len() + 4);
    let mut xff: Option<Vec<u8>> = None;
    for (name, value) in headers {
        if name == header::HOST || name == "x-forwarded-proto" || name == "x-forwarded-host" {
            continue;
        }
        if name == "x-forwarded-for" {
            let list = xff.get_or_insert_with(Vec::new);
            list.extend_from_slice(value.as_bytes());
            list.extend_from_slice(b", ");
            continue;
        }
        if name.as_str().starts_with("proxy-") || name == header::EXPECT {
            continue;
        }
        if fwd.subject.is_some_and(|s| name.as_str() == &*s.header) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    strip_connection_specific(out);
    let mut list = xff.unwrap_or_default();
    list.extend_from_slice(fwd.client_ip);
    if let Ok(v) = HeaderValue::from_bytes(&list) {
        out.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if fwd.https { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_bytes(host) {
        out.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    if let Some(subject) = fwd.subject {
        let pair = HeaderName::from_bytes(subject.header.as_bytes()).ok().zip(
            subject
                .subject
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok()),
        );
        if let Some((name, value)) = pair {
            out.insert(name, value);
        }
    }
    out.append(header::VIA, HeaderValue::from_static(VIA_H2));
    Ok(request)
}

/// The HTTP/1.1 head for an HTTP/2 upstream's response, for an HTTP/1.1 client: status line
/// (with the standard reason phrase), the fields, our Via, and the framing and persistence
/// the proxy chose. `bodiless_length`: the Content-Length of a HEAD or 304 response, which
/// describes the representation and is passed on.
pub fn write_h1_response(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    framing: crate::http1::Framing,
    persistence: crate::http1::write::Persistence,
    bodiless_length: Option<u64>,
) {
    use crate::http1::write::Persistence;
    use crate::http1::Framing;
    out.clear();
    out.reserve(256 + parts.headers.len() * 32);
    let status = parts.status.as_u16();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(crate::http1::write::reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if is_connection_specific(name) || name == header::CONTENT_LENGTH || name == header::TE {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    line(out, b"via", VIA_H2.as_bytes());
    match framing {
        Framing::Length(n) => {
            line(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
        Framing::Empty => {
            if let Some(n) = bodiless_length {
                line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            } else if !matches!(status, 204 | 304) {
                line(out, b"content-length", b"0");
            }
        }
        Framing::UntilClose => {}
    }
    match persistence {
        Persistence::KeepAlive => {}
        Persistence::KeepAlive10 => line(out, b"connection", b"keep-alive"),
        Persistence::Close => line(out, b"connection", b"close"),
    }
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The bytes of a local error or fixed response's body, as `Bytes`.
pub fn body_bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
        }
    }

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn authority_becomes_host_and_cookies_are_joined() {
        let req = http::Request::builder()
            .method("POST")
            .uri("https://example.com:8443/a/b?q=1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-thing", "v")
            .body(())
            .unwrap();
        let head = request_head(&parts(req), BodyKnown::Streaming, &limits()).unwrap();
        let raw = std::str::from_utf8(&head.raw).unwrap();
        assert!(raw.starts_with("POST /a/b?q=1 HTTP/1.1\r\nhost: example.com:8443\r\n"));
        assert!(raw.contains("\r\ncookie: a=1; b=2\r\n"), "{raw}");
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(head.route_host(), "example.com");
        assert_eq!(head.cookie("b"), Some(&b"2"[..]));
    }

    #[test]
    fn a_body_with_a_length_keeps_it_and_none_is_empty() {
        let req = http::Request::builder()
            .uri("http://a/")
            .header("content-length", "5")
            .body(())
            .unwrap();
        let head = request_head(&parts(req), BodyKnown::Streaming, &limits()).unwrap();
        assert_eq!(head.framing, Framing::Length(5));
        let req = http::Request::builder().uri("http://a/").body(()).unwrap();
        let head = request_head(&parts(req), BodyKnown::None, &limits()).unwrap();
        assert_eq!(head.framing, Framing::Empty);
        let req = http::Request::builder().uri("http://a/").body(()).unwrap();
        let head = request_head(&parts(req), BodyKnown::Whole(7), &limits()).unwrap();
        assert_eq!(head.framing, Framing::Length(7));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let host_differs = http::Request::builder()
            .uri("http://a/")
            .header("host", "b")
            .body(())
            .unwrap();
        let te = http::Request::builder()
            .uri("http://a/")
            .header("te", "gzip")
            .body(())
            .unwrap();
        let conn = http::Request::builder()
            .uri("http://a/")
            .header("connection", "close")
            .body(())
            .unwrap();
        let connect = http::Request::builder()
            .method("CONNECT")
            .uri("a:443")
            .body(())
            .unwrap();
        let mut other_protocol = http::Request::builder()
            .method("CONNECT")
            .uri("http://a/x")
            .body(())
            .unwrap();
        other_protocol
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static("connect-udp"));
        for req in [host_differs, te, conn, connect, other_protocol] {
            assert!(request_head(&parts(req), BodyKnown::None, &limits()).is_err());
        }
        let trailers_ok = http::Request::builder()
            .uri("http://a/")
            .header("te", "trailers")
            .body(())
            .unwrap();
        assert!(request_head(&parts(trailers_ok), BodyKnown::None, &limits()).is_ok());
    }

    #[test]
    fn a_websocket_connect_becomes_an_upgrade_request() {
        let mut req = http::Request::builder()
            .method("CONNECT")
            .uri("https://a.example/chat")
            .header("sec-websocket-version", "13")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        let head = request_head(&parts(req), BodyKnown::Streaming, &limits()).unwrap();
        assert_eq!(head.method, crate::http1::request::Method::Get);
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(head.upgrade.map(|u| head.bytes(u)), Some(&b"websocket"[..]));
        let key = head.field("sec-websocket-key").unwrap();
        assert_eq!(key.len(), 24);
        assert!(key.ends_with(b"=="));
    }

    #[test]
    fn hop_by_hop_response_fields_are_dropped() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: x-hop, keep-alive\r\nKeep-Alive: 5\r\nX-Hop: 1\r\n\
               Transfer-Encoding: chunked\r\nX-Keep: 2\r\n\r\n"[..],
        );
        let head = crate::http1::response::parse(&mut buf, false)
            .unwrap()
            .unwrap();
        let res = response_from_h1(&head, false).unwrap();
        let names: Vec<&str> = res.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep", "via"]);
    }

    #[test]
    fn a_request_for_an_http2_upstream_carries_ours_and_not_the_clients_forwarding_fields() {
        let req = http::Request::builder()
            .method("POST")
            .uri("http://api.example/rpc?x=1")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-proto", "https")
            .header("x-client-subject", "CN=forged")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let parts = parts(req);
        let head = request_head(&parts, BodyKnown::Streaming, &limits()).unwrap();
        let alice = crate::conn::ClientSubject {
            header: "x-client-subject".into(),
            subject: Some("CN=alice".into()),
        };
        let fwd = Forwarded {
            client_ip: b"192.0.2.7",
            https: false,
            subject: Some(&alice),
        };
        let up = upstream_request(&head, &parts.headers, &fwd).unwrap();
        assert_eq!(up.method(), "POST");
        assert_eq!(up.uri(), "http://api.example/rpc?x=1");
        let h = up.headers();
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h.get_all("x-client-subject").iter().count(), 1);
        assert_eq!(h["x-client-subject"], "CN=alice");
        assert_eq!(h["te"], "trailers", "gRPC needs it");
        assert_eq!(h["via"], "2 gatehouse");
        assert!(h.get("host").is_none(), ":authority carries it");
        // No verified subject: the client's field still never passes.
        let nobody = crate::conn::ClientSubject {
            header: "x-client-subject".into(),
            subject: None,
        };
        let fwd = Forwarded {
            subject: Some(&nobody),
            ..fwd
        };
        let up = upstream_request(&head, &parts.headers, &fwd).unwrap();
        assert!(up.headers().get("x-client-subject").is_none());
    }

    #[test]
    fn trailers_round_trip() {
        let map = trailers_from_h1(b"grpc-status: 0\r\ncontent-length: 5\r\nx-a:  b \r\n");
        assert_eq!(map.len(), 2);
        assert_eq!(map["grpc-status"], "0");
        assert_eq!(map["x-a"], "b");
        let chunk = last_chunk_with_trailers(&map);
        assert_eq!(chunk, b"0\r\ngrpc-status: 0\r\nx-a: b\r\n\r\n");
    }
}
