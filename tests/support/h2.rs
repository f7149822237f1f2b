//! HTTP/2 clients and servers for the tests: hyper's HTTP/2 client over h2c (prior knowledge)
//! or over TLS with ALPN `h2`, a hyper HTTP/2 (h2c) upstream, a certificate made with rcgen at
//! test time, and a raw frame writer and GOAWAY reader for the attack tests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::certs::TestCa;
use super::http_upstream::Body;

/// `BASE_CONFIG` with `http2 = true` on the `web` listener: h2c by prior knowledge beside
/// HTTP/1.1.
pub const H2C_CONFIG: &str = r#"[log]
access = false

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
http2 = true

"#;

/// A request body for hyper's client.
pub type ClientBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn empty() -> ClientBody {
    Full::new(Bytes::new()).boxed()
}

pub fn full(data: impl Into<Bytes>) -> ClientBody {
    Full::new(data.into()).boxed()
}

/// An HTTP/2 client connection over cleartext TCP with prior knowledge.
pub async fn h2c_client(addr: SocketAddr) -> SendRequest<ClientBody> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connecting to the proxy");
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// An HTTP/2 client connection over TLS, ALPN `h2`, trusting `cert`.
pub async fn tls_h2_client(addr: SocketAddr, cert: &TestCert) -> SendRequest<ClientBody> {
    let tls = tls_connect(addr, cert, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the proxy chose h2"
    );
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/2 handshake over TLS");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A TLS connection to the proxy offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    cert: &TestCert,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = cert.ca.client(alpn);
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connecting to the proxy");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// A certificate for `localhost` from a test CA (`support::certs`), as files a listener's
/// `tls` names.
pub struct TestCert {
    pub cert_path: String,
    pub key_path: String,
    /// The CA's certificate file, for clients such as `curl --cacert`.
    pub ca_path: String,
    ca: TestCa,
}

impl TestCert {
    pub fn localhost() -> TestCert {
        let ca = TestCa::new();
        let leaf = ca.leaf("localhost", &["localhost"]);
        TestCert {
            cert_path: leaf.cert.display().to_string(),
            key_path: leaf.key.display().to_string(),
            ca_path: ca.pem_file().display().to_string(),
            ca,
        }
    }

    /// The `tls = {...}` value for a listener.
    pub fn toml(&self) -> String {
        format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            self.cert_path, self.key_path
        )
    }
}

/// Sends `req` and reads the whole response: (status, headers, body, trailers).
pub async fn send(
    client: &mut SendRequest<ClientBody>,
    req: Request<ClientBody>,
) -> (
    http::StatusCode,
    http::HeaderMap,
    Bytes,
    Option<http::HeaderMap>,
) {
    client.ready().await.expect("connection ready");
    let res = super::within("HTTP/2 response", client.send_request(req))
        .await
        .expect("HTTP/2 response");
    let (parts, body) = res.into_parts();
    let collected = super::within("HTTP/2 response body", body.collect())
        .await
        .expect("HTTP/2 response body");
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

pub fn get(uri: &str) -> Request<ClientBody> {
    Request::builder()
        .uri(uri)
        .body(empty())
        .expect("a request")
}

type BoxFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture + Send + Sync>;

/// A hyper HTTP/2 server over cleartext TCP (h2c), counting connections and requests.
pub struct H2Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl H2Upstream {
    pub async fn start<F, Fut>(handler: F) -> H2Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        H2Upstream::serve(None, handler).await
    }

    /// The same over TLS with `tls` (its ALPN is set to `h2`).
    pub async fn start_tls<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> H2Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let mut config = rustls::ServerConfig::clone(&tls);
        config.alpn_protocols = vec![b"h2".to_vec()];
        H2Upstream::serve(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            handler,
        )
        .await
    }

    async fn serve<F, Fut>(tls: Option<tokio_rustls::TlsAcceptor>, handler: F) -> H2Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an h2c upstream");
        let addr = listener.local_addr().expect("upstream address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (c, r, done) = (
            Arc::clone(&connections),
            Arc::clone(&requests),
            Arc::clone(&closed),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                let r = Arc::clone(&r);
                let done = Arc::clone(&done);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        H2Upstream {
            addr,
            connections,
            closed,
            requests,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections that have ended.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Raw HTTP/2 frames, for what a well-behaved client never sends.
pub mod frames {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;

    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// One frame: the 9-byte header and `payload`.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The connection preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = gatehouse::http2::PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }

    /// A HEADERS block for `GET path` on `authority`, HPACK-encoded with literal fields
    /// without indexing (RFC 7541 §6.2.2), so that no encoder is needed.
    pub fn get_block(authority: &str, path: &str) -> Vec<u8> {
        let mut block = Vec::new();
        // :method GET, :scheme http are in the static table (indices 2 and 6).
        block.push(0x82);
        block.push(0x86);
        literal(&mut block, 4, path); // :path
        literal(&mut block, 1, authority); // :authority
        block
    }

    /// A literal field without indexing whose name is static-table entry `index` (below 15).
    pub fn literal(block: &mut Vec<u8>, index: u8, value: &str) {
        block.push(index & 0x0f);
        push_len(block, value.len());
        block.extend_from_slice(value.as_bytes());
    }

    /// A literal field without indexing whose name is static-table entry `index` (15 and up:
    /// the 4-bit prefix integer continues in a second byte, RFC 7541 §5.1).
    pub fn literal_high(block: &mut Vec<u8>, index: u8, value: &str) {
        block.push(0x0f);
        block.push(index - 15);
        push_len(block, value.len());
        block.extend_from_slice(value.as_bytes());
    }

    /// A literal field without indexing with a literal name.
    pub fn literal_named(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0x00);
        push_len(block, name.len());
        block.extend_from_slice(name.as_bytes());
        push_len(block, value.len());
        block.extend_from_slice(value.as_bytes());
    }

    /// An HPACK string length (7-bit prefix integer, no Huffman).
    fn push_len(block: &mut Vec<u8>, mut n: usize) {
        if n < 127 {
            block.push(n as u8);
            return;
        }
        block.push(127);
        n -= 127;
        while n >= 128 {
            block.push((n % 128 + 128) as u8);
            n /= 128;
        }
        block.push(n as u8);
    }
}

/// One frame a raw client received (its payload left out).
#[derive(Debug, Clone)]
pub struct SeenFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    /// The error code of a RST_STREAM or GOAWAY.
    pub code: Option<u32>,
}

/// What a raw client saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub frames: Vec<SeenFrame>,
    /// The connection was closed (EOF or reset) within the wait.
    pub closed: bool,
}

impl Seen {
    /// The error code of the last GOAWAY received.
    pub fn goaway(&self) -> Option<u32> {
        self.frames
            .iter()
            .rev()
            .find(|f| f.kind == frames::GOAWAY)
            .and_then(|f| f.code)
    }
}

/// Reads frames until `until` holds for what was seen, the connection closes, or `limit`
/// passes.
pub async fn read_frames<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    limit: Duration,
    until: impl Fn(&[SeenFrame]) -> bool,
) -> Seen {
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                seen.closed = true;
                return seen;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return seen,
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (buf[at] as usize) << 16 | (buf[at + 1] as usize) << 8 | buf[at + 2] as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let kind = buf[at + 3];
            let p = &buf[at + 9..at + 9 + len];
            let code = match kind {
                frames::GOAWAY if len >= 8 => Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
                frames::RST_STREAM if len >= 4 => {
                    Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
                }
                _ => None,
            };
            seen.frames.push(SeenFrame {
                kind,
                flags: buf[at + 4],
                stream: u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                    & 0x7fff_ffff,
                code,
            });
            at += 9 + len;
        }
        buf.drain(..at);
        if until(&seen.frames) {
            return seen;
        }
    }
}

/// Reads until the proxy closes the connection, for at most `limit`.
pub async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    limit: Duration,
) -> Seen {
    read_frames(stream, limit, |_| false).await
}

/// Writes `bytes` in pieces, ignoring a write error (the proxy may close first).
pub async fn write_ignoring_close(stream: &mut TcpStream, bytes: &[u8]) {
    for piece in bytes.chunks(16 * 1024) {
        if stream.write_all(piece).await.is_err() {
            return;
        }
    }
}
