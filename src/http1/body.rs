//! Streams a message body from one connection to another, decoding its framing on the way in and
//! re-framing it on the way out, through one bounded buffer: a body is never held whole.
//!
//! Used in both directions by `proxy.rs`: client -> upstream for request bodies, upstream ->
//! client for responses. Chunk data is handed on as slices of the read buffer (no copy), and each
//! chunk goes out with its framing in one vectored write.

use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Framing;
use crate::deadline;

/// How much is read from a peer at once while relaying a body.
pub const READ_CHUNK: usize = 32 * 1024;
/// A chunk-size line (with extensions) or one trailer line longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// All trailer fields together; they are read and discarded (RFC 9112 §7.1.2 lets a proxy drop
/// them, and HTTP/1.1 clients rarely use them).
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the body: {0}")]
    Read(io::Error),
    #[error("timed out reading the body")]
    ReadTimeout,
    #[error("malformed body framing: {0}")]
    Malformed(&'static str),
    #[error("body ended before its declared length")]
    Truncated,
    #[error("writing the body: {0}")]
    Write(io::Error),
    #[error("timed out writing the body")]
    WriteTimeout,
    #[error("body larger than allowed")]
    TooLarge,
}

impl RelayError {
    /// True when the failure came from the side being written to.
    pub fn is_write_side(&self) -> bool {
        matches!(self, RelayError::Write(_) | RelayError::WriteTimeout)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// Incremental body decoder over a read buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The trailer section's lines (each with its CRLF), when the caller asked to keep them:
    /// an HTTP/2 client can receive them, an HTTP/1.1 one gets none (RFC 9112 §7.1.2).
    trailers: Option<BytesMut>,
}

#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::UntilClose => State::UntilClose,
        };
        Decoder {
            state,
            trailers: None,
        }
    }

    /// Keeps the trailer fields of a chunked body instead of discarding them.
    pub fn keep_trailers(&mut self) {
        self.trailers = Some(BytesMut::new());
    }

    /// The trailer lines kept so far, `name: value\r\n` each.
    pub fn take_trailers(&mut self) -> Option<BytesMut> {
        self.trailers.take().filter(|t| !t.is_empty())
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes what it can from `buf`. `eof`: the peer has closed, no more bytes will come.
    pub fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, RelayError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Length(remaining) => {
                    if buf.is_empty() {
                        return if eof {
                            Err(RelayError::Truncated)
                        } else {
                            Ok(Decoded::NeedMore)
                        };
                    }
                    let n = remaining.min(buf.len() as u64) as usize;
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                State::UntilClose => {
                    if !buf.is_empty() {
                        return Ok(Decoded::Data(buf.split().freeze()));
                    }
                    if eof {
                        self.state = State::Done;
                        return Ok(Decoded::Done);
                    }
                    return Ok(Decoded::NeedMore);
                }
                State::Chunked(chunk) => {
                    let step = self.chunked(chunk, buf)?;
                    match step {
                        Some(decoded) => return Ok(decoded),
                        None if self.state == State::Chunked(chunk) => {
                            return if eof {
                                Err(RelayError::Truncated)
                            } else {
                                Ok(Decoded::NeedMore)
                            };
                        }
                        None => continue,
                    }
                }
            }
        }
    }

    /// One step of the chunked state machine (RFC 9112 §7.1). `Ok(None)` with the state unchanged
    /// means more bytes are needed; with the state changed, call again.
    fn chunked(&mut self, chunk: Chunk, buf: &mut BytesMut) -> Result<Option<Decoded>, RelayError> {
        match chunk {
            Chunk::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(None);
                };
                let size = parse_chunk_size(&line)?;
                self.state = if size == 0 {
                    State::Chunked(Chunk::Trailers(0))
                } else {
                    State::Chunked(Chunk::Data(size))
                };
                Ok(None)
            }
            Chunk::Data(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = remaining.min(buf.len() as u64) as usize;
                let left = remaining - n as u64;
                self.state = State::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                Ok(Some(Decoded::Data(buf.split_to(n).freeze())))
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(RelayError::Malformed("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                self.state = State::Chunked(Chunk::Size);
                Ok(None)
            }
            Chunk::Trailers(seen) => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(None);
                };
                if line.is_empty() {
                    self.state = State::Done;
                    return Ok(Some(Decoded::Done));
                }
                let seen = seen + line.len() + 2;
                if seen > MAX_TRAILERS {
                    return Err(RelayError::Malformed("trailer section too large"));
                }
                let valid = line.iter().position(|&b| b == b':').is_some_and(|colon| {
                    colon > 0
                        && line[..colon].iter().all(|&b| is_tchar(b))
                        && line[colon + 1..]
                            .iter()
                            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
                });
                if !valid {
                    return Err(RelayError::Malformed("invalid trailer field"));
                }
                if let Some(kept) = &mut self.trailers {
                    kept.extend_from_slice(&line);
                    kept.extend_from_slice(b"\r\n");
                }
                self.state = State::Chunked(Chunk::Trailers(seen));
                Ok(None)
            }
        }
    }
}

/// Checks the part of a chunked body that has already arrived, without consuming it: `Ok(true)`
/// when the whole body is there and well-formed. Run before anything is sent upstream, so that a
/// malformed body that arrives in one piece (every smuggling payload does) is refused with nothing
/// forwarded; a body that is still arriving is checked as it streams, and a fault found then
/// aborts the upstream connection mid-message, so the upstream never sees a complete request.
pub fn precheck_chunked(buf: &[u8]) -> Result<bool, RelayError> {
    let mut probe = BytesMut::from(buf);
    let mut decoder = Decoder::new(Framing::Chunked);
    loop {
        match decoder.decode(&mut probe, false)? {
            Decoded::Data(_) => {}
            Decoded::NeedMore => return Ok(false),
            Decoded::Done => return Ok(true),
        }
    }
}

/// Splits one CRLF-terminated line off `buf`, without its CRLF. A bare LF or CR is an error.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, RelayError> {
    match memchr::memchr(b'\n', buf) {
        None if buf.len() > max => Err(RelayError::Malformed("chunk line too long")),
        None => Ok(None),
        Some(0) => Err(RelayError::Malformed("bare LF in chunked framing")),
        Some(lf) if buf[lf - 1] != b'\r' => {
            Err(RelayError::Malformed("bare LF in chunked framing"))
        }
        Some(lf) => {
            let mut line = buf.split_to(lf + 1);
            line.truncate(lf - 1);
            if memchr::memchr(b'\r', &line).is_some() {
                return Err(RelayError::Malformed("bare CR in chunked framing"));
            }
            Ok(Some(line.freeze()))
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `chunk-size [ BWS ; chunk-ext ]`: hex digits only, at most 16 of them; extensions are ignored
/// but must be made of visible characters.
fn parse_chunk_size(line: &[u8]) -> Result<u64, RelayError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(RelayError::Malformed("invalid chunk size"));
    }
    if digits > 16 {
        return Err(RelayError::Malformed("chunk size overflows"));
    }
    let rest = &line[digits..];
    let ext_ok = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        None => rest.is_empty(),
        Some(i) => {
            rest[i] == b';'
                && rest[i..]
                    .iter()
                    .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        }
    };
    if !ext_ok {
        return Err(RelayError::Malformed("invalid chunk size"));
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        let v = (d as char).to_digit(16).unwrap_or(0);
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

/// Writes a body with the framing the receiving side expects.
#[derive(Debug)]
pub struct Encoder {
    chunked: bool,
}

impl Encoder {
    /// `framing` is what the outgoing head announced: chunked bodies get chunk lines, every other
    /// framing is written as it comes.
    pub fn new(framing: Framing) -> Encoder {
        Encoder {
            chunked: framing == Framing::Chunked,
        }
    }

    /// Writes `prefix` (a head still waiting to go out, often empty) and `data` in one vectored
    /// write, with chunk framing when needed; `prefix` is cleared.
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        prefix: &mut Vec<u8>,
        data: &[u8],
    ) -> io::Result<()> {
        if data.is_empty() {
            return self.flush_prefix(w, prefix).await;
        }
        if self.chunked {
            let mut line = [0u8; 18];
            let n = chunk_size_line(data.len(), &mut line);
            let mut bufs = [
                IoSlice::new(prefix),
                IoSlice::new(&line[..n]),
                IoSlice::new(data),
                IoSlice::new(b"\r\n"),
            ];
            write_all_vectored(w, &mut bufs).await?;
        } else {
            let mut bufs = [IoSlice::new(prefix), IoSlice::new(data)];
            write_all_vectored(w, &mut bufs).await?;
        }
        prefix.clear();
        Ok(())
    }

    /// Ends the body (the last chunk for chunked framing), sending `prefix` first if it is still
    /// waiting.
    pub async fn finish<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        prefix: &mut Vec<u8>,
    ) -> io::Result<()> {
        if self.chunked {
            let mut bufs = [IoSlice::new(prefix), IoSlice::new(b"0\r\n\r\n")];
            write_all_vectored(w, &mut bufs).await?;
            prefix.clear();
            Ok(())
        } else {
            self.flush_prefix(w, prefix).await
        }
    }

    async fn flush_prefix<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        prefix: &mut Vec<u8>,
    ) -> io::Result<()> {
        if !prefix.is_empty() {
            w.write_all(prefix).await?;
            prefix.clear();
        }
        Ok(())
    }
}

fn chunk_size_line(len: usize, out: &mut [u8; 18]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = 0;
    let mut v = len;
    loop {
        digits[n] = HEX[v & 0xf];
        n += 1;
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    out[n] = b'\r';
    out[n + 1] = b'\n';
    n + 2
}

/// `write_all` for several buffers, with as few syscalls as the kernel allows.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Limits and timeouts for one relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest body accepted, counted in decoded bytes.
    pub max_bytes: Option<u64>,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

/// Moves a whole body from `src` to `dst`. `buf` holds bytes already read from `src` (what came
/// after the head); bytes after the body stay in it. Returns the body length in bytes.
pub async fn relay<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    dst: &mut W,
    encoder: &Encoder,
    prefix: &mut Vec<u8>,
    limits: RelayLimits,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut eof = false;
    loop {
        match decoder.decode(buf, eof)? {
            Decoded::Data(data) => {
                total += data.len() as u64;
                if limits.max_bytes.is_some_and(|max| total > max) {
                    return Err(RelayError::TooLarge);
                }
                match deadline::limit(limits.write_timeout, encoder.write(dst, prefix, &data)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(RelayError::Write(e)),
                    Err(_) => return Err(RelayError::WriteTimeout),
                }
            }
            Decoded::Done => {
                match deadline::limit(limits.write_timeout, encoder.finish(dst, prefix)).await {
                    Ok(Ok(())) => return Ok(total),
                    Ok(Err(e)) => return Err(RelayError::Write(e)),
                    Err(_) => return Err(RelayError::WriteTimeout),
                }
            }
            Decoded::NeedMore => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                match deadline::limit(limits.read_timeout, src.read_buf(buf)).await {
                    Ok(Ok(0)) => eof = true,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(RelayError::Read(e)),
                    Err(_) => return Err(RelayError::ReadTimeout),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(framing: Framing, input: &[u8]) -> Result<(Vec<u8>, BytesMut), RelayError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf, true)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::Done => return Ok((out, buf)),
                Decoded::NeedMore => unreachable!("eof was given"),
            }
        }
    }

    #[test]
    fn chunked_decodes_and_leaves_the_rest() {
        let (body, rest) = decode_all(
            Framing::Chunked,
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT",
        )
        .unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(&rest[..], b"NEXT");
    }

    #[test]
    fn chunked_decodes_byte_by_byte() {
        let input = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            loop {
                match d.decode(&mut buf, false).unwrap() {
                    Decoded::Data(x) => out.extend_from_slice(&x),
                    Decoded::NeedMore => break,
                    Decoded::Done => break,
                }
            }
        }
        assert!(d.is_done());
        assert_eq!(out, b"abc");
    }

    #[test]
    fn chunked_rejects_bad_framing() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"ffffffffffffffffffff\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(decode_all(Framing::Chunked, bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn length_truncated_is_an_error() {
        assert!(matches!(
            decode_all(Framing::Length(10), b"abc"),
            Err(RelayError::Truncated)
        ));
        let (body, rest) = decode_all(Framing::Length(3), b"abcdef").unwrap();
        assert_eq!((&body[..], &rest[..]), (&b"abc"[..], &b"def"[..]));
    }

    #[test]
    fn chunk_size_line_is_hex() {
        let mut out = [0u8; 18];
        let n = chunk_size_line(255, &mut out);
        assert_eq!(&out[..n], b"ff\r\n");
        let n = chunk_size_line(1, &mut out);
        assert_eq!(&out[..n], b"1\r\n");
    }

    #[tokio::test]
    async fn relay_reframes_length_to_chunked() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::from(&b"hel"[..]);
        let mut d = Decoder::new(Framing::Length(5));
        let enc = Encoder::new(Framing::Chunked);
        let mut prefix = b"HEAD\r\n".to_vec();
        let writer = tokio::spawn(async move {
            client.write_all(b"lo").await.unwrap();
            client
        });
        let mut out = Vec::new();
        let limits = RelayLimits {
            max_bytes: None,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        };
        let mut c = writer.await.unwrap();
        let n = relay(
            &mut server,
            &mut buf,
            &mut d,
            &mut out,
            &enc,
            &mut prefix,
            limits,
        )
        .await
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(out, b"HEAD\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n");
        c.shutdown().await.unwrap();
    }
}
