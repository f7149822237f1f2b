//! A real HTTP/1.1 upstream (hyper) with a pluggable handler, counting what it sees.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::body::{self, Checksum};

pub type Body = BoxBody<Bytes, std::io::Error>;
type BoxFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture + Send + Sync>;

/// A hyper HTTP/1.1 server on 127.0.0.1:0, over TLS when started with `start_tls`. Aborted on
/// drop.
pub struct HttpUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: JoinHandle<()>,
}

/// What a TLS upstream saw of one completed handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub sni: Option<String>,
    pub client_cert: bool,
}

impl HttpUpstream {
    /// Serves every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> HttpUpstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        HttpUpstream::serve(None, handler).await
    }

    /// Serves every request with `handler`, over TLS with `tls`.
    pub async fn start_tls<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> HttpUpstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        HttpUpstream::serve(Some(tls), handler).await
    }

    async fn serve<F, Fut>(tls: Option<Arc<rustls::ServerConfig>>, handler: F) -> HttpUpstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an upstream");
        let addr = listener.local_addr().expect("upstream address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            handler,
            Arc::clone(&connections),
            Arc::clone(&requests),
            Arc::clone(&handshakes),
        ));
        HttpUpstream {
            addr,
            connections,
            requests,
            handshakes,
            task,
        }
    }

    /// The TLS handshakes completed so far, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().expect("handshakes lock").clone()
    }

    /// Answers every request with a description of it (see `Echo`).
    pub async fn echo() -> HttpUpstream {
        HttpUpstream::start(echo).await
    }

    /// Answers every request with 200 and `text`.
    pub async fn fixed(text: &'static str) -> HttpUpstream {
        HttpUpstream::start(move |_req| async move { text_response(200, text) }).await
    }

    /// Answers every request with a `len`-byte pattern body (see `body`), streamed in 64 KiB
    /// blocks; with `content_length` false it is sent chunked.
    pub async fn sized(len: u64, content_length: bool) -> HttpUpstream {
        HttpUpstream::start(move |_req| async move { pattern_response(len, content_length) }).await
    }

    /// Waits `delay`, then answers 200 with `text`.
    pub async fn delayed(delay: Duration, text: &'static str) -> HttpUpstream {
        HttpUpstream::start(move |_req| async move {
            tokio::time::sleep(delay).await;
            text_response(200, text)
        })
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests whose head has been received so far (counted before the handler runs).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived; fails the test after `STEP_TIMEOUT`.
    pub async fn wait_for_requests(&self, n: usize) {
        let seen = super::poll_until(super::STEP_TIMEOUT, || async {
            (self.requests() >= n).then_some(())
        })
        .await;
        assert!(
            seen.is_some(),
            "upstream saw {} requests, expected at least {n}",
            self.requests()
        );
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Handler,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections.fetch_add(1, Ordering::SeqCst);
        let handler = Arc::clone(&handler);
        let requests = Arc::clone(&requests);
        let tls = tls.clone();
        let handshakes = Arc::clone(&handshakes);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                requests.fetch_add(1, Ordering::SeqCst);
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            // Errors here are the proxy hanging up, which some tests do on purpose.
            match tls {
                None => {
                    let _ = builder
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let session = stream.get_ref().1;
                    handshakes.lock().expect("handshakes lock").push(Handshake {
                        sni: session.server_name().map(str::to_owned),
                        client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
                    });
                    let _ = builder
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

pub fn text_response(status: u16, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_owned()))
        .map_err(|never| match never {})
        .boxed();
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(body)
        .expect("a valid test response")
}

/// A `len`-byte pattern body, streamed block by block.
pub fn pattern_response(len: u64, content_length: bool) -> Response<Body> {
    let stream = futures_util::stream::iter(body::blocks(len))
        .map(|block| Ok::<_, std::io::Error>(Frame::data(block)));
    let mut builder = Response::builder().status(200);
    if content_length {
        builder = builder.header("content-length", len);
    }
    builder
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid test response")
}

/// The echo handler: reads the whole body (checksumming it as it streams in) and answers 200
/// with a text description of the request that `Echo::parse` reads back.
pub async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut sum = Checksum::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    sum.update(data);
                }
            }
            Err(err) => return text_response(500, &format!("echo: body error: {err}\n")),
        }
    }
    let mut text = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{}: {}\n",
            name,
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push_str(&format!(
        "\nbody-length: {}\nbody-checksum: {}\n",
        sum.len,
        sum.hex()
    ));
    text_response(200, &text)
}

/// What the echo upstream saw, parsed back from its response body.
#[derive(Debug, Clone)]
pub struct Echo {
    pub method: String,
    pub target: String,
    pub version: String,
    /// Names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_checksum: String,
    pub raw: String,
}

impl Echo {
    pub fn parse(text: &str) -> Echo {
        let (head, tail) = text
            .split_once("\n\n")
            .unwrap_or_else(|| panic!("not an echo body: {text:?}"));
        let mut lines = head.lines();
        let first = lines.next().unwrap_or_default();
        let mut parts = first.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let version = parts.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
            .collect();
        let field = |name: &str| {
            tail.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("echo body lacks {name}: {text:?}"))
                .to_owned()
        };
        Echo {
            method,
            target,
            version,
            headers,
            body_len: field("body-length: ").parse().expect("echo body-length"),
            body_checksum: field("body-checksum: "),
            raw: text.to_owned(),
        }
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}
