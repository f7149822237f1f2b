//! Target parsing and an HTTP/1.x response reader that finds each response's
//! last byte (Content-Length, chunked, or close-delimited) while discarding bodies.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub struct Target {
    pub addr: SocketAddr,
    /// Host header value as it appeared in the URL (host[:port]).
    pub host: String,
    pub path: String,
}

/// Parses `http://HOST[:PORT]/PATH`. HOST must be a loopback IP or `localhost`:
/// this tool never sends traffic anywhere else.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = parse_addr(authority, 80)?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// Parses `HOST[:PORT]` (IPv6 in brackets) and checks it is loopback.
pub fn parse_addr(authority: &str, default_port: u16) -> Result<SocketAddr, String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("{authority}: unclosed ["))?;
        let port = v6[end + 1..].strip_prefix(':');
        (&v6[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{authority}: bad port"))?,
        None => default_port,
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("{authority}: host must be a loopback IP or localhost"))?
    };
    if !ip.is_loopback() {
        return Err(format!("{authority}: refusing non-loopback target"));
    }
    Ok(SocketAddr::new(ip, port))
}

pub fn build_request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gh-load\r\n\r\n").into_bytes()
}

/// Header lines longer than this (or heads with more headers than fit) are an error.
const MAX_HEAD: usize = 64 * 1024;

pub struct Response {
    pub status: u16,
    /// The server will (or did) close the connection after this response.
    pub close: bool,
}

/// Per-connection read buffer; unconsumed bytes are `buf[pos..]`.
pub struct Reader {
    buf: Vec<u8>,
    pos: usize,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed mid-response",
    )
}

impl Reader {
    pub fn new(cap: usize) -> Self {
        Reader {
            buf: Vec::with_capacity(cap),
            pos: 0,
        }
    }

    /// Reads more bytes, keeping the unconsumed ones. Returns 0 on EOF.
    async fn fill(&mut self, s: &mut TcpStream) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.buf.len() == self.buf.capacity() {
            self.buf.drain(..self.pos);
            self.pos = 0;
            if self.buf.len() >= MAX_HEAD {
                return Err(bad("response head too large"));
            }
            self.buf.reserve(self.buf.len().max(4096));
        }
        s.read_buf(&mut self.buf).await
    }

    /// Skips `n` body bytes, reading (and throwing away) as needed.
    async fn skip(&mut self, s: &mut TcpStream, mut n: u64) -> io::Result<()> {
        loop {
            let take = n.min((self.buf.len() - self.pos) as u64);
            self.pos += take as usize;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill(s).await? == 0 {
                return Err(eof());
            }
        }
    }

    /// Returns the index of the '\r' ending the next line (buffer-absolute).
    async fn line_end(&mut self, s: &mut TcpStream) -> io::Result<usize> {
        let mut from = self.pos;
        loop {
            if let Some(i) = memchr::memmem::find(&self.buf[from..], b"\r\n") {
                return Ok(from + i);
            }
            let keep = self.buf.len().saturating_sub(1).max(self.pos) - self.pos;
            if self.fill(s).await? == 0 {
                return Err(eof());
            }
            from = self.pos + keep; // fill may have moved data to the front
        }
    }

    /// Reads one full response (head and body); returns when its last byte is in.
    /// `head_request`: the request was HEAD, so no body follows whatever the headers say.
    pub async fn read_response(
        &mut self,
        s: &mut TcpStream,
        head_request: bool,
    ) -> io::Result<Response> {
        loop {
            // Parse the head; copy out what we need before any further read.
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Response::new(&mut headers);
                match r.parse(&self.buf[self.pos..]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let status = r.code.unwrap_or(0);
                        let http10 = r.version == Some(0);
                        let mut close = http10;
                        let mut chunked = false;
                        let mut len: Option<u64> = None;
                        for h in r.headers.iter() {
                            let v = h.value;
                            if h.name.eq_ignore_ascii_case("content-length") {
                                let t = std::str::from_utf8(v).ok().map(str::trim);
                                len = Some(
                                    t.and_then(|t| t.parse().ok())
                                        .ok_or_else(|| bad("bad Content-Length"))?,
                                );
                            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                chunked = v.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
                            } else if h.name.eq_ignore_ascii_case("connection") {
                                for t in v.split(|&b| b == b',') {
                                    let t = t.trim_ascii();
                                    if t.eq_ignore_ascii_case(b"close") {
                                        close = true;
                                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                                        close = false;
                                    }
                                }
                            }
                        }
                        Some((n, status, close, chunked, len))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err(bad(&format!("bad response head: {e}"))),
                }
            };
            let Some((n, status, mut close, chunked, len)) = parsed else {
                if self.fill(s).await? == 0 {
                    return Err(eof());
                }
                continue;
            };
            self.pos += n;
            if (100..200).contains(&status) {
                continue; // interim response (100 Continue): the real one follows
            }
            if head_request || status == 204 || status == 304 {
                // no body
            } else if chunked {
                self.skip_chunked(s).await?;
            } else if let Some(len) = len {
                self.skip(s, len).await?;
            } else {
                // Close-delimited body: read to EOF.
                self.pos = self.buf.len();
                while self.fill(s).await? > 0 {
                    self.pos = self.buf.len();
                }
                close = true;
            }
            return Ok(Response { status, close });
        }
    }

    async fn skip_chunked(&mut self, s: &mut TcpStream) -> io::Result<()> {
        loop {
            let end = self.line_end(s).await?;
            let line = &self.buf[self.pos..end];
            let hex = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or(line)
                .trim_ascii();
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            self.pos = end + 2;
            if size == 0 {
                // Trailer section: lines until an empty one.
                loop {
                    let end = self.line_end(s).await?;
                    let empty = end == self.pos;
                    self.pos = end + 2;
                    if empty {
                        return Ok(());
                    }
                }
            }
            self.skip(s, size + 2).await?; // chunk data and its CRLF
        }
    }
}

pub fn is_emfile(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::EMFILE as i32)
        || e.raw_os_error() == Some(nix::errno::Errno::ENFILE as i32)
}
