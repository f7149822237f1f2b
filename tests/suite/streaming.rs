//! Bodies too large to buffer cross the proxy intact, and bodiless responses stay bodiless.
//!
//! These tests check integrity only (length and an order-sensitive checksum). That the proxy
//! streams rather than buffers is what makes them pass quickly, but no test measures time or
//! memory.

use std::time::Duration;

use futures_util::StreamExt;

use crate::support::body::{self, Checksum};
use crate::support::http_upstream::{text_response, Body};
use crate::support::raw::RawConn;
use crate::support::{client_with_timeout, upstream_toml, Echo, HttpUpstream, Proxy};

const BIG: u64 = 64 * 1024 * 1024;

async fn proxy_to(up: &HttpUpstream, extra_route_settings: &str) -> Proxy {
    Proxy::start(&format!(
        "{}[[route]]\npath = \"/\"\nupstream = \"app\"\n{extra_route_settings}\n",
        upstream_toml("app", &[up.addr()]),
    ))
    .await
}

/// Downloads `url` chunk by chunk (never holding the body) and returns its checksum.
async fn download(url: &str) -> (u16, Checksum) {
    let resp = client_with_timeout(Duration::from_secs(240))
        .get(url)
        .send()
        .await
        .expect("GET through the proxy");
    let status = resp.status().as_u16();
    let mut sum = Checksum::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("body broke off after {} bytes: {e}", sum.len));
        sum.update(&chunk);
    }
    (status, sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_with_content_length_is_streamed_intact() {
    let up = HttpUpstream::sized(BIG, true).await;
    let proxy = proxy_to(&up, "").await;
    let (status, got) = download(&proxy.url("/big")).await;
    assert_eq!(status, 200);
    assert_eq!(got.len, BIG);
    assert_eq!(got, body::expected(BIG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_response_is_streamed_intact() {
    let up = HttpUpstream::sized(BIG, false).await;
    let proxy = proxy_to(&up, "").await;
    let (status, got) = download(&proxy.url("/big")).await;
    assert_eq!(status, 200);
    assert_eq!(got.len, BIG);
    assert_eq!(got, body::expected(BIG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_request_body_reaches_the_upstream_intact() {
    let up = HttpUpstream::echo().await;
    let proxy = proxy_to(&up, "max_body_bytes = \"100MiB\"").await;
    // A stream body of unknown length: reqwest sends it chunked.
    let stream = futures_util::stream::iter(body::blocks(BIG)).map(Ok::<_, std::io::Error>);
    let resp = client_with_timeout(Duration::from_secs(240))
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("POST through the proxy");
    assert_eq!(resp.status().as_u16(), 200);
    let echo = Echo::parse(&resp.text().await.expect("echo body"));
    assert_eq!(echo.header("transfer-encoding"), Some("chunked"), "{}", echo.raw);
    assert_eq!(echo.body_len, BIG);
    assert_eq!(echo.body_checksum, body::expected(BIG).hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_body_with_content_length_reaches_the_upstream_intact() {
    const LEN: u64 = 16 * 1024 * 1024;
    let up = HttpUpstream::echo().await;
    let proxy = proxy_to(&up, "max_body_bytes = \"100MiB\"").await;
    let data: Vec<u8> = body::blocks(LEN).flat_map(|b| b.to_vec()).collect();
    let resp = client_with_timeout(Duration::from_secs(240))
        .post(proxy.url("/upload"))
        .body(data)
        .send()
        .await
        .expect("POST through the proxy");
    assert_eq!(resp.status().as_u16(), 200);
    let echo = Echo::parse(&resp.text().await.expect("echo body"));
    let len = LEN.to_string();
    assert_eq!(echo.header("content-length"), Some(len.as_str()), "{}", echo.raw);
    assert_eq!(echo.body_len, LEN);
    assert_eq!(echo.body_checksum, body::expected(LEN).hex());
}

/// HEAD, 204 and 304 answers carry no body; a body there would be read as the next response.
async fn bodiless_upstream() -> HttpUpstream {
    HttpUpstream::start(|req| async move {
        let mut resp: hyper::Response<Body> = match req.uri().path() {
            "/204" => text_response(204, ""),
            "/304" => text_response(304, ""),
            _ => text_response(200, "0123456789"),
        };
        if req.uri().path() == "/304" {
            resp.headers_mut()
                .insert("etag", hyper::header::HeaderValue::from_static("\"v1\""));
        }
        resp
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_responses_have_no_body() {
    let up = bodiless_upstream().await;
    let proxy = proxy_to(&up, "").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    // Pipelined, so that a stray body byte would corrupt the response after it.
    conn.send(
        b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n\
          GET /204 HTTP/1.1\r\nHost: a.test\r\n\r\n\
          GET /304 HTTP/1.1\r\nHost: a.test\r\nIf-None-Match: \"v1\"\r\n\r\n\
          GET /after HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let head = conn.read_response(true).await;
    assert_eq!(head.status, 200, "{}", head.head);
    if let Some(len) = head.header("content-length") {
        assert_eq!(len, "10", "HEAD keeps the GET's Content-Length: {}", head.head);
    }
    let no_content = conn.read_response(false).await;
    assert_eq!(no_content.status, 204, "{}", no_content.head);
    let not_modified = conn.read_response(false).await;
    assert_eq!(not_modified.status, 304, "{}", not_modified.head);
    let after = conn.read_response(false).await;
    assert_eq!(after.status, 200, "{}", after.head);
    assert_eq!(after.body_text(), "0123456789");
    let rest = conn.read_to_end(Duration::from_secs(10)).await;
    assert!(
        rest.bytes.is_empty(),
        "bytes after the last response: {:?}",
        rest.text()
    );
}
