//! Forwarding one request: which route it takes, which headers the upstream sees, how bodies
//! and client keep-alive are handled.

use crate::support::raw::{self, RawConn};
use crate::support::{client, route_toml, upstream_toml, Checksum, Echo, HttpUpstream, Proxy};

/// An echo upstream named `app` behind a catch-all route.
async fn echo_proxy() -> (HttpUpstream, Proxy) {
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_request_with_forwarded_headers_and_host_unchanged() {
    let (_up, proxy) = echo_proxy().await;
    let resp = client()
        .get(proxy.url("/api/items?x=1&y=%20z"))
        .header("host", "app.example.com")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-custom", "kept")
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(resp.status().as_u16(), 200);
    let echo = Echo::parse(&resp.text().await.expect("body"));
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.target, "/api/items?x=1&y=%20z", "{}", echo.raw);
    assert_eq!(echo.header("host"), Some("app.example.com"), "{}", echo.raw);
    assert_eq!(
        echo.header_all("x-forwarded-for"),
        vec!["10.0.0.1, 127.0.0.1"],
        "{}",
        echo.raw
    );
    assert_eq!(
        echo.header("x-forwarded-proto"),
        Some("http"),
        "{}",
        echo.raw
    );
    assert_eq!(
        echo.header("x-forwarded-host"),
        Some("app.example.com"),
        "{}",
        echo.raw
    );
    assert_eq!(echo.header("via"), Some("1.1 gatehouse"), "{}", echo.raw);
    assert_eq!(echo.header("x-custom"), Some("kept"), "{}", echo.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_created_when_absent() {
    let (_up, proxy) = echo_proxy().await;
    let resp = client()
        .get(proxy.url("/"))
        .send()
        .await
        .expect("request through the proxy");
    let echo = Echo::parse(&resp.text().await.expect("body"));
    assert_eq!(
        echo.header_all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "{}",
        echo.raw
    );
    // reqwest sends the authority as Host; it must arrive as sent.
    let host = proxy.addr().to_string();
    assert_eq!(echo.header("host"), Some(host.as_str()), "{}", echo.raw);
    assert_eq!(
        echo.header("x-forwarded-host"),
        Some(host.as_str()),
        "{}",
        echo.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strips_hop_by_hop_request_headers() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(
        b"GET /hop HTTP/1.1\r\n\
          Host: app.example.com\r\n\
          Connection: close, X-Hop-Custom\r\n\
          X-Hop-Custom: secret\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Trailer: X-Checksum\r\n\
          Upgrade: h2c\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-End-To-End: yes\r\n\
          \r\n",
    )
    .await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let echo = Echo::parse(&resp.body_text());
    for name in [
        "x-hop-custom",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
    ] {
        assert_eq!(
            echo.header(name),
            None,
            "hop-by-hop header {name} reached the upstream:\n{}",
            echo.raw
        );
    }
    // The proxy may state its own wishes for the upstream hop, but not forward the client's.
    for value in echo.header_all("connection") {
        assert!(
            value.eq_ignore_ascii_case("keep-alive"),
            "the client's Connection header reached the upstream: {value:?}\n{}",
            echo.raw
        );
    }
    assert_eq!(echo.header("x-end-to-end"), Some("yes"), "{}", echo.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strips_hop_by_hop_response_headers() {
    let up = raw::RawUpstream::fixed(
        b"HTTP/1.1 200 OK\r\n\
          Content-Length: 3\r\n\
          Connection: X-Upstream-Hop\r\n\
          X-Upstream-Hop: secret\r\n\
          Keep-Alive: timeout=5, max=100\r\n\
          Proxy-Authenticate: Basic realm=\"x\"\r\n\
          Upgrade: h2c\r\n\
          Trailer: X-Sum\r\n\
          X-Visible: yes\r\n\
          \r\n\
          ok\n",
    )
    .await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    for name in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "upgrade",
        "trailer",
    ] {
        assert!(
            !resp.has_header(name),
            "hop-by-hop response header {name} reached the client:\n{}",
            resp.head
        );
    }
    assert!(
        !resp.connection_has("x-upstream-hop"),
        "the upstream's Connection header reached the client:\n{}",
        resp.head
    );
    assert_eq!(resp.header("x-visible"), Some("yes"), "{}", resp.head);
    assert_eq!(resp.body_text(), "ok\n");
}

/// Answers `GET path` with `Host: host` and returns (status, body).
async fn get_with_host(proxy: &Proxy, host: &str, path: &str) -> (u16, String) {
    let resp = client()
        .get(proxy.url(path))
        .header("host", host)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} Host {host}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

fn respond_route(host: Option<&str>, path: &str, body: &str) -> String {
    let host = host
        .map(|h| format!("host = \"{h}\"\n"))
        .unwrap_or_default();
    format!(
        "[[route]]\n{host}path = \"{path}\"\nrespond = {{ status = 200, body = \"{body}\\n\" }}\n\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_precedence() {
    let config = [
        respond_route(None, "/", "default-root"),
        respond_route(None, "/api/", "default-api"),
        respond_route(None, "/api/v2/", "default-api-v2"),
        respond_route(Some("*.example.com"), "/", "wildcard-root"),
        respond_route(Some("app.example.com"), "/app/", "exact-app"),
    ]
    .concat();
    let proxy = Proxy::start(&config).await;
    let cases = [
        ("app.example.com", "/app/x", "exact-app"),
        // The exact group has no route for this path: fall through to the wildcard group.
        ("app.example.com", "/other", "wildcard-root"),
        // Host matching ignores case and the port.
        ("APP.Example.COM:8080", "/app/", "exact-app"),
        ("foo.example.com", "/app/x", "wildcard-root"),
        ("foo.example.com", "/api/v2/x", "wildcard-root"),
        ("other.org", "/api/v2/x", "default-api-v2"),
        ("other.org", "/api/x", "default-api"),
        // Prefixes are matched as bytes: "/api/" is not a prefix of "/apix".
        ("other.org", "/apix", "default-root"),
        ("other.org", "/", "default-root"),
    ];
    for (host, path, want) in cases {
        let (status, body) = get_with_host(&proxy, host, path).await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("{want}\n").as_str()),
            "Host {host} path {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_route_is_404() {
    let proxy = Proxy::start(&respond_route(Some("app.example.com"), "/", "app")).await;
    let (status, body) = get_with_host(&proxy, "other.example.com", "/").await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.is_empty(), "a 404 carries a short text body");
    let (status, _) = get_with_host(&proxy, "app.example.com", "/").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_route_answers_its_status_and_body() {
    let proxy = Proxy::start(
        "[[route]]\n\
         name = \"teapot\"\n\
         path = \"/\"\n\
         respond = { status = 418, body = \"short and stout\\n\" }\n",
    )
    .await;
    let (status, body) = get_with_host(&proxy, "x.test", "/anything").await;
    assert_eq!((status, body.as_str()), (418, "short and stout\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sequential_requests_on_one_client_connection() {
    let (up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..100 {
        conn.send(format!("GET /seq/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        assert!(
            !resp.connection_has("close"),
            "request {i} closed the keep-alive connection: {}",
            resp.head
        );
        let echo = Echo::parse(&resp.body_text());
        assert_eq!(echo.target, format!("/seq/{i}"));
    }
    assert_eq!(up.requests(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    let mut batch = Vec::new();
    for i in 0..10 {
        batch.extend_from_slice(
            format!("GET /pipe/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes(),
        );
    }
    conn.send(&batch).await;
    for i in 0..10 {
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        assert_eq!(Echo::parse(&resp.body_text()).target, format!("/pipe/{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_gets_response_then_close() {
    let (_up, proxy) = echo_proxy().await;
    let ex = raw::send(proxy.addr(), b"GET /old HTTP/1.0\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(ex.status(), Some(200), "{}", ex.text());
    assert!(
        ex.closed(),
        "an HTTP/1.0 request without keep-alive must end with the connection closed; got {:?} after {:?}",
        ex.ending,
        ex.text()
    );
    assert_eq!(ex.response_count(), 1, "{}", ex.text());
    assert!(
        !ex.text()
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked is not HTTP/1.0: {}",
        ex.text()
    );
    assert!(ex.body().contains("GET /old"), "{}", ex.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keep_alive_is_honoured() {
    let (up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..3 {
        conn.send(
            format!("GET /ka/{i} HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        assert!(
            resp.connection_has("keep-alive"),
            "an HTTP/1.0 keep-alive response must say so: {}",
            resp.head
        );
        assert!(resp.has_header("content-length"), "{}", resp.head);
    }
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_with_content_length_is_forwarded_with_content_length() {
    let (_up, proxy) = echo_proxy().await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let want = Checksum::of(&data);
    let resp = client()
        .post(proxy.url("/upload"))
        .body(data)
        .send()
        .await
        .expect("POST through the proxy");
    assert_eq!(resp.status().as_u16(), 200);
    let echo = Echo::parse(&resp.text().await.expect("body"));
    assert_eq!(
        echo.header("content-length"),
        Some("100000"),
        "{}",
        echo.raw
    );
    assert_eq!(echo.header("transfer-encoding"), None, "{}", echo.raw);
    assert_eq!(echo.body_len, 100_000);
    assert_eq!(echo.body_checksum, want.hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_is_forwarded_chunked() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(
        b"POST /chunked HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
    )
    .await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let echo = Echo::parse(&resp.body_text());
    assert_eq!(
        echo.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        echo.raw
    );
    assert_eq!(echo.header("content-length"), None, "{}", echo.raw);
    assert_eq!(echo.body_len, 12);
    assert_eq!(echo.body_checksum, Checksum::of(b"hello, world").hex());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(
        b"POST /expect HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    // The body is only sent once the 100 arrives: a proxy that waited for it would hang here.
    let interim = conn.read_response(false).await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    conn.send(b"hello").await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let echo = Echo::parse(&resp.body_text());
    assert_eq!(
        echo.header("expect"),
        None,
        "Expect was forwarded: {}",
        echo.raw
    );
    assert_eq!(echo.body_len, 5);
    assert_eq!(echo.body_checksum, Checksum::of(b"hello").hex());
    // And the connection is still usable.
    conn.send(b"GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    let after = conn.read_response(false).await;
    assert_eq!(after.status, 200, "{}", after.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_supplied_forwarded_headers_cannot_spoof_proto_or_host() {
    let (_up, proxy) = echo_proxy().await;
    let resp = client()
        .get(proxy.url("/spoof"))
        .header("host", "app.example.com")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .expect("request through the proxy");
    let echo = Echo::parse(&resp.text().await.expect("body"));
    assert_eq!(
        echo.header_all("x-forwarded-proto"),
        vec!["http"],
        "{}",
        echo.raw
    );
    assert_eq!(
        echo.header_all("x-forwarded-host"),
        vec!["app.example.com"],
        "{}",
        echo.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_request_headers_keep_their_order() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Multi: first\r\nX-Other: o\r\nX-Multi: second\r\n\r\n")
        .await;
    let resp = conn.read_response(false).await;
    let echo = Echo::parse(&resp.body_text());
    assert_eq!(
        echo.header_all("x-multi"),
        vec!["first", "second"],
        "{}",
        echo.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_response_headers_reach_the_client() {
    let up = raw::RawUpstream::fixed(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let resp = conn.read_response(false).await;
    let cookies: Vec<&str> = resp
        .headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, vec!["a=1", "b=2"], "{}", resp.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_client_is_honoured() {
    let (_up, proxy) = echo_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200);
    assert!(resp.connection_has("close"), "{}", resp.head);
    assert!(
        conn.closed_within(std::time::Duration::from_secs(10)).await,
        "connection left open after Connection: close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connection_is_closed_after_client_idle() {
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "[timeouts]\nclient_idle = \"1s\"\n\n{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(conn.read_response(false).await.status, 200);
    // client_idle is 1 s; 15 s only keeps the test from hanging if it is not enforced.
    assert!(
        conn.closed_within(std::time::Duration::from_secs(15)).await,
        "an idle keep-alive connection outlived client_idle"
    );
}
