//! Bodies too large to buffer cross the proxy intact, and bodiless responses stay bodiless.
//!
//! These tests check integrity only (length and an order-sensitive checksum). That the proxy
//! streams rather than buffers is what makes them pass quickly, but no test measures time or
//! memory.

use std::time::Duration;

use futures_util::StreamExt;

use crate::support::body::{self, Checksum};
use crate::support::http_upstream::{text_response, Body};
use crate::support::raw::{self, After, RawConn, RawUpstream};
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
    assert_eq!(
        echo.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        echo.raw
    );
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
    assert_eq!(
        echo.header("content-length"),
        Some(len.as_str()),
        "{}",
        echo.raw
    );
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
        assert_eq!(
            len, "10",
            "HEAD keeps the GET's Content-Length: {}",
            head.head
        );
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

async fn proxy_to_raw(up: &RawUpstream, upstream_settings: &str) -> Proxy {
    Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\n{upstream_settings}\n\n[[route]]\npath = \"/\"\nupstream = \"app\"\n",
        up.addr()
    ))
    .await
}

const CLOSE_DELIMITED: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nread until the upstream closes\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_response_reaches_http11_and_http10_clients_intact() {
    let up = RawUpstream::scripted(CLOSE_DELIMITED, After::Close).await;
    let proxy = proxy_to_raw(&up, "").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), "read until the upstream closes\n");

    let ex = raw::send(proxy.addr(), b"GET /b HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(ex.status(), Some(200), "{}", ex.text());
    assert!(ex.closed(), "{:?}", ex.ending);
    assert_eq!(
        ex.body(),
        "read until the upstream closes\n",
        "{}",
        ex.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_to_an_http10_client_is_not_chunked() {
    let up = HttpUpstream::sized(300_000, false).await;
    let proxy = proxy_to(&up, "").await;
    let ex = raw::send(proxy.addr(), b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(ex.status(), Some(200));
    assert!(ex.closed(), "{:?}", ex.ending);
    let (head, body) = ex
        .bytes
        .split_at(raw::find(&ex.bytes, b"\r\n\r\n").expect("a response head") + 4);
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(Checksum::of(body), body::expected(300_000), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_body_closes_the_client_connection() {
    let up = RawUpstream::scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        After::Close,
    )
    .await;
    let proxy = proxy_to_raw(&up, "").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let ex = conn.read_to_end(Duration::from_secs(15)).await;
    assert_eq!(ex.status(), Some(200), "{}", ex.text());
    assert!(
        ex.closed(),
        "the client waits forever for a body the upstream will never send: {:?}",
        ex.text()
    );
    assert_eq!(ex.response_count(), 1, "{}", ex.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_body_is_cut_off_after_the_read_timeout() {
    let up = RawUpstream::scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        After::Hang,
    )
    .await;
    let proxy = proxy_to_raw(&up, "timeouts = { read = \"500ms\" }").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    // read is 500 ms; 15 s only keeps the test from hanging if it is not enforced.
    let ex = conn.read_to_end(Duration::from_secs(15)).await;
    assert_eq!(ex.status(), Some(200), "{}", ex.text());
    assert!(
        ex.closed(),
        "a stalled upstream body is still being waited on: {:?}",
        ex.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_from_the_upstream_are_not_taken_as_final() {
    let up = RawUpstream::scripted(
        b"HTTP/1.1 100 Continue\r\n\r\n\
          HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfinal\n",
        After::Close,
    )
    .await;
    let proxy = proxy_to_raw(&up, "").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let mut resp = conn.read_response(false).await;
    for _ in 0..3 {
        if resp.status >= 200 {
            break;
        }
        assert_ne!(resp.status, 100, "the upstream's 100 Continue was relayed");
        resp = conn.read_response(false).await;
    }
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), "final\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_with_both_framings_is_never_relayed_ambiguously() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length. A proxy may refuse the
    // response (502) or relay the chunked body; it must not forward both headers.
    let up = RawUpstream::scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        After::Close,
    )
    .await;
    let proxy = proxy_to_raw(&up, "").await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let resp = conn.read_response(false).await;
    assert!(
        !(resp.has_header("content-length") && resp.has_header("transfer-encoding")),
        "both framings relayed:\n{}",
        resp.head
    );
    match resp.status {
        502 => {}
        200 => assert_eq!(resp.body_text(), "hello", "{}", resp.head),
        other => panic!("unexpected status {other}:\n{}", resp.head),
    }
}

/// `/big` streams 8 MiB, anything else answers "small".
async fn big_and_small_upstream() -> HttpUpstream {
    HttpUpstream::start(|req| async move {
        if req.uri().path() == "/big" {
            crate::support::http_upstream::pattern_response(8 * 1024 * 1024, true)
        } else {
            text_response(200, "small")
        }
    })
    .await
}

/// 20 sequential keep-alive requests for `/small` must all get "small": a pooled connection
/// left in the middle of an earlier exchange would answer with leftovers of it.
async fn assert_pool_is_clean(proxy: &Proxy) {
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..20 {
        conn.send(b"GET /small HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(
            (resp.status, resp.body_text().as_str()),
            (200, "small"),
            "request {i} after an aborted exchange: {}",
            resp.head
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abandoning_a_download_does_not_poison_the_pool() {
    let up = big_and_small_upstream().await;
    let proxy = proxy_to(&up, "").await;
    for _ in 0..3 {
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await;
        let mut got = 0;
        let mut buf = vec![0u8; 16 * 1024];
        while got < 64 * 1024 {
            use tokio::io::AsyncReadExt;
            let n = crate::support::within("reading the start of /big", conn.stream.read(&mut buf))
                .await
                .expect("reading /big");
            assert!(n > 0, "closed early");
            got += n;
        }
        drop(conn);
    }
    assert_pool_is_clean(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_abandoning_an_upload_does_not_poison_the_pool() {
    let up = big_and_small_upstream().await;
    let proxy = proxy_to(&up, "max_body_bytes = \"10MiB\"").await;
    for _ in 0..3 {
        let mut conn = RawConn::connect(proxy.addr()).await;
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        request.extend_from_slice(&[b'u'; 1000]);
        conn.send(&request).await;
        drop(conn);
    }
    assert_pool_is_clean(&proxy).await;
}
