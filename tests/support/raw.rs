//! Raw TCP on both sides: upstreams that misbehave on purpose, and a client that sends exactly
//! the bytes a test gives it (including requests no real HTTP client would produce).

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The canned answer of the recording upstream.
pub const RECORD_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nupstream-ok\n";

/// A raw TCP upstream on 127.0.0.1:0. Aborted on drop.
pub struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections on which the serving function returned (the peer closed, or it was done).
    finished: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

/// What a scripted upstream does after writing its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Close the connection (FIN).
    Close,
    /// Keep the connection open and silent until the peer closes it.
    Hang,
}

impl RawUpstream {
    /// Runs `serve` on every accepted connection, with the shared receive log.
    async fn start<F>(serve: F) -> RawUpstream
    where
        F: Fn(TcpStream, Arc<Mutex<Vec<u8>>>) -> ConnFuture + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a raw upstream");
        let addr = listener.local_addr().expect("raw upstream address");
        let connections = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let connections = Arc::clone(&connections);
            let finished = Arc::clone(&finished);
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let served = serve(stream, Arc::clone(&received));
                    let finished = Arc::clone(&finished);
                    tokio::spawn(async move {
                        served.await;
                        finished.fetch_add(1, Ordering::SeqCst);
                    });
                }
            })
        };
        RawUpstream {
            addr,
            connections,
            finished,
            received,
            task,
        }
    }

    /// Records every byte it receives. Answers `RECORD_RESPONSE` to each request head whose
    /// method is GET, and nothing to anything else (so that a body the proxy should never have
    /// forwarded cannot be answered either).
    pub async fn recording() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    if !read_recorded(&mut stream, &mut buf, &received, &mut pending).await {
                        return;
                    }
                    while let Some(end) = find(&pending, b"\r\n\r\n") {
                        let head: Vec<u8> = pending.drain(..end + 4).collect();
                        if head.starts_with(b"GET ")
                            && stream.write_all(RECORD_RESPONSE).await.is_err()
                        {
                            return;
                        }
                    }
                }
            })
        })
        .await
    }

    /// Answers the first request on each connection (`200`, body "ok\n", keep-alive), then
    /// reads the next request head and closes without answering: a pooled connection that passed
    /// every liveness check and still dies under the next request, as when the server's idle
    /// timeout fires just as the request arrives.
    pub async fn one_answer_per_connection() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                let mut answered = false;
                loop {
                    if !read_recorded(&mut stream, &mut buf, &received, &mut pending).await {
                        return;
                    }
                    let Some(end) = find(&pending, b"\r\n\r\n") else {
                        continue;
                    };
                    if answered {
                        return;
                    }
                    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                    let body_len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while pending.len() < end + 4 + body_len {
                        if !read_recorded(&mut stream, &mut buf, &received, &mut pending).await {
                            return;
                        }
                    }
                    pending.drain(..end + 4 + body_len);
                    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                    answered = true;
                }
            })
        })
        .await
    }

    /// Accepts, reads and records, never answers; holds the connection until the peer closes.
    pub async fn hang() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    lock(&received).extend_from_slice(&buf[..n]);
                }
            })
        })
        .await
    }

    /// Reads a request head, answers with bytes that are not HTTP, then closes.
    pub async fn garbage() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                if read_head(&mut stream, &received).await {
                    let _ = stream
                        .write_all(b"this is not HTTP at all\r\n\x00\x01\x02\r\n\r\n")
                        .await;
                    let _ = stream.shutdown().await;
                }
            })
        })
        .await
    }

    /// Reads a request head, then resets the connection (SO_LINGER 0, close: an RST, no FIN).
    pub async fn reset() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                if read_head(&mut stream, &received).await {
                    let _ = stream.set_zero_linger();
                    drop(stream);
                }
            })
        })
        .await
    }

    /// Reads a request head, then closes cleanly (FIN) without answering.
    pub async fn close_without_answer() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                if read_head(&mut stream, &received).await {
                    let _ = stream.shutdown().await;
                }
            })
        })
        .await
    }

    /// Answers one request with a complete 200 (Content-Length, keep-alive implied, no
    /// `Connection: close`) and then closes: the connection looks reusable to the proxy but is
    /// dead by the time the next request wants it.
    pub async fn close_after_response() -> RawUpstream {
        RawUpstream::start(|mut stream, received| {
            Box::pin(async move {
                if read_head(&mut stream, &received).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                        .await;
                    let _ = stream.shutdown().await;
                }
            })
        })
        .await
    }

    /// Reads one request head, writes `response` exactly as given (it may be incomplete or
    /// malformed on purpose), then closes or hangs.
    pub async fn scripted(response: &'static [u8], after: After) -> RawUpstream {
        RawUpstream::start(move |mut stream, received| {
            Box::pin(async move {
                if !read_head(&mut stream, &received).await {
                    return;
                }
                if stream.write_all(response).await.is_err() {
                    return;
                }
                match after {
                    After::Close => {
                        let _ = stream.shutdown().await;
                    }
                    After::Hang => {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .await
    }

    /// Answers every request head with `response` (which must be complete and
    /// self-delimiting), keeping the connection open.
    pub async fn fixed(response: &'static [u8]) -> RawUpstream {
        RawUpstream::start(move |mut stream, received| {
            Box::pin(async move {
                while read_head(&mut stream, &received).await {
                    if stream.write_all(response).await.is_err() {
                        return;
                    }
                }
            })
        })
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections that have ended (for the recording and hanging upstreams: the proxy closed
    /// them).
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    /// Every byte received so far, over all connections.
    pub fn received(&self) -> Vec<u8> {
        lock(&self.received).clone()
    }

    pub fn received_text(&self) -> String {
        String::from_utf8_lossy(&self.received()).into_owned()
    }

    pub fn clear(&self) {
        lock(&self.received).clear();
    }

    /// Waits until the bytes received contain `needle`; false after `limit`.
    pub async fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        super::poll_until(limit, || async {
            self.received_text().contains(needle).then_some(())
        })
        .await
        .is_some()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads once, appending what came both to the shared receive log and to `pending`; false when
/// the peer closed or the read failed.
async fn read_recorded(
    stream: &mut TcpStream,
    buf: &mut [u8],
    received: &Mutex<Vec<u8>>,
    pending: &mut Vec<u8>,
) -> bool {
    match stream.read(buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            lock(received).extend_from_slice(&buf[..n]);
            pending.extend_from_slice(&buf[..n]);
            true
        }
    }
}

fn lock(m: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads (and records) until a blank line ends a request head; false if the peer closed first.
/// Only for upstreams that serve body-less requests: bytes after the head stay in the socket
/// buffer of the kernel only by luck, so tests using these upstreams send GETs.
async fn read_head(stream: &mut TcpStream, received: &Mutex<Vec<u8>>) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so that nothing after the head is consumed; heads in tests are small.
    while find(&head, b"\r\n\r\n").is_none() {
        match stream.read(&mut byte).await {
            Ok(1) => {
                head.push(byte[0]);
                lock(received).push(byte[0]);
            }
            _ => return false,
        }
        if head.len() > 64 * 1024 {
            return false;
        }
    }
    true
}

/// How a raw client's read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The proxy closed the connection (FIN).
    Closed,
    /// The proxy reset the connection (RST), after any bytes shown were received.
    Reset,
    /// Still open when the client stopped waiting.
    StillOpen,
}

/// Everything a raw client received on one connection.
#[derive(Debug, Clone)]
pub struct RawExchange {
    pub bytes: Vec<u8>,
    pub ending: Ending,
}

impl RawExchange {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of the first response, if the bytes start with a status line.
    pub fn status(&self) -> Option<u16> {
        status_of(&self.text())
    }

    /// How many final (non-1xx) status lines were received.
    pub fn response_count(&self) -> usize {
        let text = self.text();
        text.match_indices("HTTP/1.")
            .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n'))
            .filter(|(i, _)| status_of(&text[*i..]).is_some_and(|s| s >= 200))
            .count()
    }

    /// True when the proxy ended the connection (FIN or RST) rather than leaving it open.
    pub fn closed(&self) -> bool {
        self.ending != Ending::StillOpen
    }

    /// The body of the first response: what follows its blank line.
    pub fn body(&self) -> String {
        let text = self.text();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }
}

/// The status code in a status line at the start of `text`.
pub fn status_of(text: &str) -> Option<u16> {
    let rest = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    rest.get(..3)?.parse().ok()
}

/// Connects to `addr`, writes `request`, and reads until the proxy closes the connection or
/// `wait` passes. Write errors are ignored: a proxy may answer and close before reading it all.
pub async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawExchange {
    let mut conn = RawConn::connect(addr).await;
    let _ = conn.stream.write_all(request).await;
    conn.read_to_end(wait).await
}

/// `exchange` with a 10 s wait: for requests after which the proxy must close the connection.
pub async fn send(addr: SocketAddr, request: &[u8]) -> RawExchange {
    exchange(addr, request, Duration::from_secs(10)).await
}

/// One parsed response read by `RawConn`.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub version: String,
    pub status: u16,
    /// Names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub head: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// True when a `Connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection that speaks HTTP/1.1 by hand: write any bytes, read whole responses
/// (Content-Length, chunked, or to close), so keep-alive can be tested request by request.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = super::within("connecting to the proxy", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("writing to the proxy: {e}"));
    }

    /// Reads one response; `head_request` says whether it answers a HEAD (no body).
    /// Fails the test on a timeout, a close before the response ends, or a parse error.
    pub async fn read_response(&mut self, head_request: bool) -> RawResponse {
        match super::within("reading a response", self.try_read_response(head_request)).await {
            Ok(resp) => resp,
            Err(err) => panic!(
                "reading a response: {err}; received so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Like `read_response`, but returns what went wrong instead of failing.
    pub async fn try_read_response(&mut self, head_request: bool) -> Result<RawResponse, String> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.fill().await? == 0 {
                return Err("connection closed before a complete response head".into());
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_of(status_line).ok_or(format!("bad status line {status_line:?}"))?;
        let version = status_line.split(' ').next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines {
            let (n, v) = line
                .split_once(':')
                .ok_or(format!("bad header line {line:?}"))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut resp = RawResponse {
            version,
            status,
            headers,
            body: Vec::new(),
            head,
        };
        let no_body = head_request || status < 200 || status == 204 || status == 304;
        if no_body {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = self.read_chunked().await?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad content-length {len}"))?;
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    return Err(format!(
                        "closed after {} of {len} body bytes",
                        self.buf.len()
                    ));
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await? != 0 {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line().await?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailers, then the blank line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err("closed inside a chunk".into());
                }
            }
            body.extend(self.buf.drain(..size));
            if self.buf.drain(..2).as_slice() != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
        }
    }

    async fn read_line(&mut self) -> Result<String, String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err("closed inside a chunked body".into());
            }
        }
    }

    /// Reads once more into the buffer; Ok(0) at end of stream.
    async fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read error: {e}"))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads everything until the proxy closes (or resets) the connection, or `wait` passes.
    /// Bytes already buffered by `read_response` come first.
    pub async fn read_to_end(mut self, wait: Duration) -> RawExchange {
        let mut bytes = std::mem::take(&mut self.buf);
        let deadline = tokio::time::Instant::now() + wait;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => {
                    return RawExchange {
                        bytes,
                        ending: Ending::StillOpen,
                    }
                }
                Ok(Ok(0)) => {
                    return RawExchange {
                        bytes,
                        ending: Ending::Closed,
                    }
                }
                Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {
                    return RawExchange {
                        bytes,
                        ending: Ending::Reset,
                    }
                }
                Ok(Err(e)) => panic!("reading from the proxy: {e}"),
            }
        }
    }

    /// True when the proxy has closed this connection: a read returns end of stream (or a
    /// reset) within `wait`. Any bytes read are a failure: nothing more was expected.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) => true,
            Ok(Ok(n)) => panic!(
                "expected the connection to close, got {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Ok(Err(_)) => true,
        }
    }
}
