//! HTTP/1.1 wire format (RFC 9112): strict head parsing, body framing, head serialization.
//!
//! Neighbours: `conn.rs` feeds client bytes to `request::parse`; `proxy.rs` uses `write` to build
//! the head sent upstream, `response::parse` for the upstream's answer, and `body` to stream
//! either body with its framing re-done. Tokenising is httparse's; every rule a proxy must add on
//! top (smuggling shapes, hop-by-hop fields, framing precedence) lives here.
//!
//! Heads are kept as the bytes that arrived (`Bytes`) plus offsets, so forwarding a header is a
//! copy of its bytes into the outgoing head, never an allocation per field.

pub mod body;
pub mod request;
pub mod response;
pub mod write;

use std::ops::Range;

/// A byte range inside a head's `raw` bytes; u32 keeps a header entry at 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn of(base: &[u8], part: &[u8]) -> Span {
        // Both slices come from the same buffer, so the address difference is the offset.
        let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize) as u32;
        Span {
            start,
            end: start + part.len() as u32,
        }
    }

    pub fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn get(self, raw: &[u8]) -> &[u8] {
        &raw[self.range()]
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    /// As the request line writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }

    fn from_httparse(v: Option<u8>) -> Version {
        match v {
            Some(0) => Version::Http10,
            _ => Version::Http11,
        }
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the upstream closes the connection.
    UntilClose,
}

/// What the proxy does with a header field when forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Forwarded as received.
    Pass,
    /// Hop-by-hop (RFC 9110 §7.6.1) or framing we redo ourselves: never forwarded.
    Drop,
    Host,
    XForwardedFor,
    /// X-Forwarded-Proto/-Host: replaced by ours; a client cannot set them at the edge.
    XForwardedOther,
    Via,
    /// Content-Length: dropped and regenerated, except on bodiless responses (HEAD, 304) where
    /// it describes the representation and is passed through.
    ContentLength,
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: Span,
    pub value: Span,
    pub kind: FieldKind,
}

/// Classifies a field by name. Names listed in `Connection` are dropped in a second pass.
fn classify(name: &[u8]) -> FieldKind {
    let eq = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if eq("te") => FieldKind::Drop,
        3 if eq("via") => FieldKind::Via,
        4 if eq("host") => FieldKind::Host,
        6 if eq("expect") => FieldKind::Drop,
        7 if eq("upgrade") || eq("trailer") => FieldKind::Drop,
        10 if eq("connection") || eq("keep-alive") => FieldKind::Drop,
        14 if eq("content-length") => FieldKind::ContentLength,
        15 if eq("x-forwarded-for") => FieldKind::XForwardedFor,
        16 if eq("x-forwarded-host") => FieldKind::XForwardedOther,
        17 if eq("transfer-encoding") => FieldKind::Drop,
        17 if eq("x-forwarded-proto") => FieldKind::XForwardedOther,
        _ if name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-") => FieldKind::Drop,
        _ => FieldKind::Pass,
    }
}

/// Splits a comma-separated field value into trimmed, non-empty elements (RFC 9110 §5.6.1).
pub(crate) fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Parses a Content-Length value strictly: ASCII digits only, no sign, no list, no overflow.
/// RFC 9110 §8.6 lets a recipient accept `42, 42`; we do not, because a smuggling attempt is far
/// likelier than a legitimate sender doing that.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let value = trim_ows(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Every line of a head must end in CRLF. httparse accepts a bare LF as a line end (RFC 9112
/// §2.2 allows it); a proxy must not, because the next hop may split the lines differently.
pub(crate) fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        for bad in [
            &b""[..],
            b"-1",
            b"+5",
            b"12a",
            b"1 2",
            b"5, 5",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_content_length(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn classify_knows_hop_by_hop_fields() {
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Authorization",
            "proxy-connection",
            "Expect",
        ] {
            assert_eq!(classify(name.as_bytes()), FieldKind::Drop, "{name}");
        }
        assert_eq!(classify(b"X-Forwarded-Proto"), FieldKind::XForwardedOther);
        assert_eq!(classify(b"content-length"), FieldKind::ContentLength);
        assert_eq!(classify(b"Accept"), FieldKind::Pass);
    }

    #[test]
    fn bare_lf_is_found() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: a\r\n\n"));
    }
}
