//! Every way a request can fail maps to the right status, with a short text body.

use std::time::Duration;

use crate::support::proxy::metric_value;
use crate::support::raw::{self, Ending, RawUpstream};
use crate::support::{client, closed_port, poll_until, HttpUpstream, Proxy};

/// One upstream per failure mode, each behind its own path prefix.
struct Failing {
    proxy: Proxy,
    _echo: HttpUpstream,
    _reset: RawUpstream,
    _closed: RawUpstream,
    _garbage: RawUpstream,
    _hang: RawUpstream,
}

async fn failing_proxy() -> Failing {
    let echo = HttpUpstream::echo().await;
    let reset = RawUpstream::reset().await;
    let closed = RawUpstream::close_without_answer().await;
    let garbage = RawUpstream::garbage().await;
    let hang = RawUpstream::hang().await;
    let config = format!(
        r#"[timeouts]
client_header = "1s"

[limits]
max_header_bytes = "4KiB"
max_headers = 20
max_uri_bytes = "1KiB"

[upstream.app]
servers = ["{echo}"]

[upstream.refused]
servers = ["{refused}"]

[upstream.reset]
servers = ["{reset}"]

[upstream.closed]
servers = ["{closed}"]

[upstream.garbage]
servers = ["{garbage}"]

[upstream.hang]
servers = ["{hang}"]
timeouts = {{ response_header = "500ms" }}

[upstream.hang_default]
servers = ["{hang}"]

[[route]]
path = "/"
upstream = "app"
max_body_bytes = "1KiB"

[[route]]
path = "/refused/"
upstream = "refused"

[[route]]
path = "/reset/"
upstream = "reset"

[[route]]
path = "/closed/"
upstream = "closed"

[[route]]
path = "/garbage/"
upstream = "garbage"

[[route]]
path = "/hang/"
upstream = "hang"

[[route]]
name = "hang_route_override"
path = "/hang-route/"
upstream = "hang_default"
timeouts = {{ response_header = "300ms" }}
"#,
        echo = echo.addr(),
        refused = closed_port(),
        reset = reset.addr(),
        closed = closed.addr(),
        garbage = garbage.addr(),
        hang = hang.addr(),
    );
    Failing {
        proxy: Proxy::start(&config).await,
        _echo: echo,
        _reset: reset,
        _closed: closed,
        _garbage: garbage,
        _hang: hang,
    }
}

async fn get(proxy: &Proxy, path: &str) -> (u16, String) {
    let resp = client()
        .get(proxy.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn assert_short_text(status: u16, body: &str) {
    assert!(
        !body.trim().is_empty() && body.len() < 1024,
        "a {status} carries a short text body, got {body:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502() {
    let f = failing_proxy().await;
    for path in ["/refused/x", "/reset/x", "/closed/x", "/garbage/x"] {
        let (status, body) = get(&f.proxy, path).await;
        assert_eq!(status, 502, "GET {path}: {body}");
        assert_short_text(status, &body);
    }
    // The proxy is still healthy afterwards.
    let (status, _) = get(&f.proxy, "/ok").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_is_504() {
    let f = failing_proxy().await;
    let (status, body) = get(&f.proxy, "/hang/x").await;
    assert_eq!(status, 504, "{body}");
    assert_short_text(status, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_response_header_timeout_overrides_the_upstream_one() {
    // The upstream's own response_header is the 60 s default; the route says 300 ms. The client
    // allows 20 s, so only the route's setting can produce a 504 here.
    let f = failing_proxy().await;
    let resp = crate::support::client_with_timeout(Duration::from_secs(20))
        .get(f.proxy.url("/hang-route/x"))
        .send()
        .await
        .expect("the route's timeout answers well before the client gives up");
    assert_eq!(resp.status().as_u16(), 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_is_counted_in_metrics() {
    let f = failing_proxy().await;
    let (status, _) = get(&f.proxy, "/refused/x").await;
    assert_eq!(status, 502);
    let series = r#"gatehouse_upstream_errors_total{upstream="refused",kind="connect_refused"}"#;
    let counted = poll_until(Duration::from_secs(5), || async {
        let text = f.proxy.metrics().await;
        metric_value(&text, series).filter(|v| *v >= 1.0)
    })
    .await;
    assert!(
        counted.is_some(),
        "{series} not >= 1:\n{}",
        f.proxy.metrics().await
    );
}

/// Sends raw bytes and expects `status`, a short body, and the connection closed after it.
async fn expect_rejected(proxy: &Proxy, request: &[u8], status: u16) {
    let ex = raw::send(proxy.addr(), request).await;
    assert_eq!(
        ex.status(),
        Some(status),
        "request {:?}\ngot {:?} ({:?})",
        String::from_utf8_lossy(&request[..request.len().min(200)]),
        ex.text(),
        ex.ending
    );
    assert_short_text(status, &ex.body());
    assert!(
        ex.closed(),
        "connection left open after a {status}: {:?}",
        ex.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400() {
    let f = failing_proxy().await;
    for request in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET\r\nHost: a\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nNo-Colon-Here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        expect_rejected(&f.proxy, request, 400).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_is_431() {
    let f = failing_proxy().await;
    let big = "x".repeat(8 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    expect_rejected(&f.proxy, request.as_bytes(), 431).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_is_431() {
    let f = failing_proxy().await;
    let mut request = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..40 {
        request.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    request.push_str("\r\n");
    expect_rejected(&f.proxy, request.as_bytes(), 431).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_target_is_414() {
    let f = failing_proxy().await;
    // 2000 bytes: over max_uri_bytes (1 KiB), well under max_header_bytes (4 KiB).
    let path = format!("/{}", "a".repeat(2000));
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    expect_rejected(&f.proxy, request.as_bytes(), 414).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_the_limit_is_413() {
    let f = failing_proxy().await;
    let body = "b".repeat(2048);
    let request = format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n{body}");
    let ex = raw::send(f.proxy.addr(), request.as_bytes()).await;
    assert_eq!(ex.status(), Some(413), "{:?}", ex.text());
    assert_short_text(413, &ex.body());
    // At the limit is fine.
    let (status, _) = {
        let resp = client()
            .post(f.proxy.url("/upload"))
            .body(vec![b'b'; 1024])
            .send()
            .await
            .expect("POST at the limit");
        (resp.status().as_u16(), ())
    };
    assert_eq!(status, 200, "a body of exactly max_body_bytes is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    let f = failing_proxy().await;
    let chunk = "c".repeat(800);
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
         320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    let ex = raw::send(f.proxy.addr(), request.as_bytes()).await;
    assert_eq!(ex.status(), Some(413), "{:?}", ex.text());
    assert_short_text(413, &ex.body());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_head_is_disconnected_after_client_header() {
    let f = failing_proxy().await;
    // client_header is 1 s; the head below never ends. Waiting up to 15 s only keeps the test
    // from hanging when the timeout is not enforced.
    let ex = raw::exchange(
        f.proxy.addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Partial: ",
        Duration::from_secs(15),
    )
    .await;
    assert_ne!(
        ex.ending,
        Ending::StillOpen,
        "a client stalled mid-head is still connected; received {:?}",
        ex.text()
    );
    if !ex.bytes.is_empty() {
        assert_eq!(ex.status(), Some(408), "{:?}", ex.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_do_not_take_the_proxy_down() {
    let f = failing_proxy().await;
    for _ in 0..3 {
        let _ = raw::send(f.proxy.addr(), b"GARBAGE\r\n\r\n").await;
        let _ = get(&f.proxy, "/reset/x").await;
        let _ = get(&f.proxy, "/garbage/x").await;
    }
    let (status, _) = get(&f.proxy, "/ok").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_is_disconnected_after_client_body() {
    let echo = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "[timeouts]\nclient_body = \"1s\"\n\n{}{}",
        crate::support::upstream_toml("app", &[echo.addr()]),
        crate::support::route_toml("/", "app")
    ))
    .await;
    // 3 of 10 promised bytes, then nothing. 15 s only keeps the test from hanging.
    let ex = raw::exchange(
        proxy.addr(),
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",
        Duration::from_secs(15),
    )
    .await;
    assert_ne!(
        ex.ending,
        Ending::StillOpen,
        "a client stalled mid-body is still connected; received {:?}",
        ex.text()
    );
    if !ex.bytes.is_empty() {
        assert_eq!(ex.status(), Some(408), "{:?}", ex.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_wait_for_a_free_slot() {
    let proxy = Proxy::start(
        "[limits]\nmax_connections = 2\n\n\
         [[route]]\npath = \"/\"\nrespond = { status = 200, body = \"hi\\n\" }\n",
    )
    .await;
    let mut first = crate::support::raw::RawConn::connect(proxy.addr()).await;
    let mut second = crate::support::raw::RawConn::connect(proxy.addr()).await;
    for conn in [&mut first, &mut second] {
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(conn.read_response(false).await.status, 200);
    }
    // The third connection completes in the kernel's backlog but is not served while two are
    // open. Waiting 500 ms for nothing cannot fail a correct proxy, only miss a broken one.
    let mut third = crate::support::raw::RawConn::connect(proxy.addr()).await;
    third.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let early =
        tokio::time::timeout(Duration::from_millis(500), third.try_read_response(false)).await;
    assert!(
        early.is_err(),
        "a third connection was served over max_connections = 2: {early:?}"
    );
    drop(first);
    let resp = third.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
}
