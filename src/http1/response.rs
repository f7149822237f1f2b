//! Parses an upstream's response head and decides how its body is framed (RFC 9112 §6.3).
//!
//! An upstream is trusted more than a client, but not blindly: a response whose framing is
//! ambiguous is answered with 502 rather than relayed, because the client's parser might read it
//! differently from ours.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use super::{
    classify, has_bare_lf, list_elements, parse_content_length, Field, FieldKind, Framing, Span,
    Version,
};

/// Upstream heads larger than this are refused (nginx's `proxy_buffer_size` is 4-8 KiB).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_FIELDS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid response from upstream: {0}")]
pub struct BadResponse(pub &'static str);

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub raw: Bytes,
    pub version: Version,
    pub status: u16,
    pub reason: Span,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// Whether the upstream connection may carry another request after this response.
    pub reusable: bool,
}

impl ResponseHead {
    pub fn bytes(&self, span: Span) -> &[u8] {
        span.get(&self.raw)
    }

    pub fn is_informational(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// Looks for a complete response head at the start of `buf`; `Ok(None)` means read more.
/// `request_was_head`: a response to HEAD has no body whatever its fields say.
pub fn parse(
    buf: &mut BytesMut,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, BadResponse> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised slots: zeroing 128 headers (4 KiB) per parse showed in profiles.
    let mut storage =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut storage,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(BadResponse("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse("too many header fields")),
        Err(_) => return Err(BadResponse("malformed response head")),
    };
    let base = &buf[..head_len];
    if has_bare_lf(base) {
        return Err(BadResponse("line not terminated by CRLF"));
    }
    let (Some(status), Some(version)) = (res.code, res.version) else {
        return Err(BadResponse("incomplete status line"));
    };
    if !(100..=999).contains(&status) {
        return Err(BadResponse("invalid status code"));
    }
    let version = Version::from_httparse(Some(version));
    let reason = Span::of(base, res.reason.unwrap_or("").as_bytes());

    let mut fields = Vec::with_capacity(res.headers.len());
    let mut content_length = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut close = false;
    let mut keep_alive = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let kind = classify(name);
        match kind {
            FieldKind::ContentLength => {
                let n =
                    parse_content_length(h.value).ok_or(BadResponse("invalid Content-Length"))?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(BadResponse("conflicting Content-Length values"));
                }
                content_length = Some(n);
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                for coding in list_elements(h.value) {
                    if chunked {
                        // chunked must be the final coding, applied once.
                        return Err(BadResponse("coding applied after chunked"));
                    }
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        chunked = true;
                    } else {
                        other_coding = true;
                    }
                }
            }
            FieldKind::Drop if name.eq_ignore_ascii_case(b"connection") => {
                for token in list_elements(h.value) {
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            _ => {}
        }
        fields.push(Field {
            name: Span::of(base, name),
            value: Span::of(base, h.value),
            kind,
        });
    }
    // Connection-named fields are hop-by-hop too.
    for i in 0..fields.len() {
        let f = fields[i];
        if f.kind == FieldKind::Drop && f.name.get(base).eq_ignore_ascii_case(b"connection") {
            for token in list_elements(f.value.get(base)) {
                for g in fields.iter_mut() {
                    if g.name.get(base).eq_ignore_ascii_case(token) {
                        g.kind = FieldKind::Drop;
                    }
                }
            }
        }
    }

    let bodiless =
        request_was_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::Empty
    } else if chunked || other_coding {
        if content_length.is_some() {
            return Err(BadResponse("both Content-Length and Transfer-Encoding"));
        }
        if other_coding {
            // We would have to relay a coding we strip the label of; refuse instead.
            return Err(BadResponse("unsupported transfer coding"));
        }
        Framing::Chunked
    } else {
        match content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let reusable =
        framing != Framing::UntilClose && !close && (version == Version::Http11 || keep_alive);

    let raw = buf.split_to(head_len).freeze();
    Ok(Some(ResponseHead {
        raw,
        version,
        status,
        reason,
        fields,
        framing,
        reusable,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str, head: bool) -> Result<Option<ResponseHead>, BadResponse> {
        parse(&mut BytesMut::from(s.as_bytes()), head)
    }

    fn ok(s: &str) -> ResponseHead {
        match parse_str(s, false) {
            Ok(Some(h)) => h,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").framing,
            Framing::Length(3)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        let h = ok("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.reusable);
        assert_eq!(
            ok("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            ok("HTTP/1.1 304 Not Modified\r\n\r\n").framing,
            Framing::Empty
        );
        let h = parse_str("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true);
        assert_eq!(h.ok().flatten().map(|h| h.framing), Some(Framing::Empty));
    }

    #[test]
    fn reuse_rules() {
        assert!(ok("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").reusable);
        assert!(!ok("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").reusable);
        assert!(!ok("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").reusable);
        assert!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n").reusable
        );
    }

    #[test]
    fn ambiguous_responses_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse_str(bad, false).is_err(), "{bad:?}");
        }
    }
}
