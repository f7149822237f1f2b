//! gh-backend: the upstream every proxy in the benchmark talks to.
//!
//! It has to be as cheap as possible so that the proxies, not the backend, are
//! what is measured: one thread (tokio current-thread runtime), responses built
//! once at start and written with a single `write_all` per read batch, a
//! hand-rolled parser that only looks for what it needs (request line,
//! Content-Length, Connection, Transfer-Encoding).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(about = "Minimal HTTP/1.1 keep-alive upstream for the Gatehouse benchmark")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// listen(2) backlog; large so connection bursts from proxies are not refused.
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
}

// Relaxed atomics: the runtime is single-threaded, these are only read by /__stats.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Largest request head accepted; past it the connection gets 431 and is closed.
const MAX_HEAD: usize = 64 * 1024;

/// One pre-built response: status line, headers and body in one buffer, so the
/// common case is a single copy (or a single write for the large bodies).
struct Prebuilt {
    bytes: Vec<u8>,
    head_len: usize,
}

/// The three connection-header variants of a response, chosen per request.
struct Variants {
    /// HTTP/1.1 keep-alive: no Connection header at all (the default).
    keep11: Prebuilt,
    /// HTTP/1.0 client that asked for keep-alive: must be told explicitly.
    keep10: Prebuilt,
    /// Closing after this response.
    close: Prebuilt,
}

struct Responses {
    small: Variants,
    k64: Variants,
    m1: Variants,
}

fn body(len: usize) -> Vec<u8> {
    // Printable, deterministic filler; content does not matter, length does.
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn prebuild(status: &str, ctype: &str, body: &[u8], conn: &str) -> Prebuilt {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{conn}\r\n",
        body.len()
    );
    let mut bytes = Vec::with_capacity(head.len() + body.len());
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(body);
    Prebuilt {
        bytes,
        head_len: head.len(),
    }
}

fn variants(status: &str, ctype: &str, body: &[u8]) -> Variants {
    Variants {
        keep11: prebuild(status, ctype, body, ""),
        keep10: prebuild(status, ctype, body, "Connection: keep-alive\r\n"),
        close: prebuild(status, ctype, body, "Connection: close\r\n"),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Small,
    K64,
    M1,
    Stats,
}

struct Head {
    kind: Kind,
    is_head: bool,
    http11: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    content_length: u64,
    chunked: bool,
}

/// Parses a request head (everything before the blank line). `None` means malformed.
fn parse_head(head: &[u8]) -> Option<Head> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next()?;
    let mut parts = request_line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return None,
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    let kind = match path {
        b"/64k" => Kind::K64,
        b"/1m" => Kind::M1,
        b"/__stats" => Kind::Stats,
        _ => Kind::Small,
    };
    let mut h = Head {
        kind,
        is_head: method == b"HEAD",
        http11,
        conn_close: false,
        conn_keep_alive: false,
        content_length: 0,
        chunked: false,
    };
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            h.content_length = std::str::from_utf8(value).ok()?.parse().ok()?;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                h.conn_close |= t.eq_ignore_ascii_case(b"close");
                h.conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            h.chunked = true; // any transfer-coding on a request: we do not decode it
        }
    }
    Some(h)
}

fn stats_response(keep: bool, http11: bool) -> Vec<u8> {
    let body = format!(
        "{{\"connections\":{},\"requests\":{}}}",
        CONNECTIONS.load(Ordering::Relaxed),
        REQUESTS.load(Ordering::Relaxed)
    );
    let conn = match (keep, http11) {
        (false, _) => "Connection: close\r\n",
        (true, false) => "Connection: keep-alive\r\n",
        (true, true) => "",
    };
    prebuild("200 OK", "application/json", body.as_bytes(), conn).bytes
}

async fn serve(mut s: TcpStream, r: &'static Responses) -> io::Result<()> {
    // Responses are small and written whole: no point waiting for Nagle.
    s.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut pos = 0usize; // start of unparsed data in buf
    let mut scanned = 0usize; // bytes after pos already searched for "\r\n\r\n"
    let mut discard: u64 = 0; // request body bytes still to skip
    let mut out: Vec<u8> = Vec::new(); // batched responses to pipelined requests
    let finder = memchr::memmem::Finder::new(b"\r\n\r\n");
    loop {
        if pos == buf.len() {
            buf.clear();
            pos = 0;
        } else if buf.len() == buf.capacity() {
            // Keep the partial request, make room behind it.
            buf.drain(..pos);
            pos = 0;
            if buf.len() >= MAX_HEAD {
                s.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                return Ok(());
            }
            buf.reserve(buf.len().max(4096));
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        loop {
            if discard > 0 {
                let take = discard.min((buf.len() - pos) as u64);
                pos += take as usize;
                discard -= take;
                if discard > 0 {
                    break;
                }
            }
            let avail = &buf[pos..];
            let from = scanned.saturating_sub(3);
            let Some(idx) = finder.find(&avail[from..]) else {
                scanned = avail.len();
                break;
            };
            let head_end = from + idx + 4;
            let Some(h) = parse_head(&avail[..head_end]) else {
                out.extend_from_slice(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                s.write_all(&out).await?;
                return Ok(());
            };
            pos += head_end;
            scanned = 0;
            if h.chunked {
                // Chunked request bodies are not needed by the benchmark; refuse
                // rather than mis-frame the next request.
                out.extend_from_slice(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                s.write_all(&out).await?;
                return Ok(());
            }
            discard = h.content_length;
            let keep = if h.http11 {
                !h.conn_close
            } else {
                h.conn_keep_alive && !h.conn_close
            };
            if h.kind == Kind::Stats {
                let resp = stats_response(keep, h.http11);
                out.extend_from_slice(&resp);
            } else {
                REQUESTS.fetch_add(1, Ordering::Relaxed);
                let v = match h.kind {
                    Kind::K64 => &r.k64,
                    Kind::M1 => &r.m1,
                    _ => &r.small,
                };
                let p = match (keep, h.http11) {
                    (false, _) => &v.close,
                    (true, true) => &v.keep11,
                    (true, false) => &v.keep10,
                };
                let bytes = if h.is_head {
                    &p.bytes[..p.head_len]
                } else {
                    &p.bytes[..]
                };
                if bytes.len() > 16 * 1024 {
                    // Large bodies go straight from the pre-built buffer, no copy.
                    if !out.is_empty() {
                        s.write_all(&out).await?;
                        out.clear();
                    }
                    s.write_all(bytes).await?;
                } else {
                    out.extend_from_slice(bytes);
                }
            }
            if !keep {
                s.write_all(&out).await?;
                return Ok(());
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
}

fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Restarting between benchmark rounds must not fail on TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    TcpListener::from_std(sock.into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "gh-backend: refusing to listen on non-loopback address {}",
            args.listen
        );
        std::process::exit(2);
    }
    // Built once, lives for the whole process: handlers borrow it without refcounts.
    let responses: &'static Responses = Box::leak(Box::new(Responses {
        small: variants("200 OK", "text/plain", &body(100)),
        k64: variants("200 OK", "application/octet-stream", &body(65536)),
        m1: variants("200 OK", "application/octet-stream", &body(1 << 20)),
    }));
    let listener = match listen(args.listen, args.backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gh-backend: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("gh-backend: cannot install signal handlers");
        std::process::exit(1);
    };
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let _ = serve(stream, responses).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: say so, back off briefly instead of spinning.
                    eprintln!("gh-backend: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
}
