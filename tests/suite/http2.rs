//! HTTP/2 from clients: h2c with prior knowledge and h2 over TLS (ALPN) to HTTP/1.1 upstreams,
//! the translation both ways, flow control with bodies larger than a window, trailers, and the
//! ways a connection ends (drain, reload, idle) with GOAWAY.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::h2::{self as h2s, TestCert, H2C_CONFIG};
use crate::support::http_upstream::{self, HttpUpstream};
use crate::support::{self, body, route_toml, upstream_toml, within, Echo, Proxy};

async fn h2c_proxy(upstream: std::net::SocketAddr, extra: &str) -> Proxy {
    Proxy::start_toml(&format!(
        "{H2C_CONFIG}{extra}{}{}",
        upstream_toml("app", &[upstream]),
        route_toml("/", "app")
    ))
    .await
}

#[tokio::test]
async fn h2c_request_is_translated_for_an_http1_upstream() {
    let up = HttpUpstream::echo().await;
    let proxy = h2c_proxy(up.addr(), "").await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let req = Request::builder()
        .uri("http://app.example:8080/echo/path?q=1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("x-custom", "kept")
        .header("te", "trailers")
        .body(h2s::empty())
        .unwrap();
    let (status, headers, body, _) = h2s::send(&mut client, req).await;
    assert_eq!(status, 200);
    let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.target, "/echo/path?q=1");
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(
        echo.header("host"),
        Some("app.example:8080"),
        "{}",
        echo.raw
    );
    // RFC 9113 §8.2.3: the cookie fields are one field again for HTTP/1.1.
    assert_eq!(echo.header_all("cookie"), ["a=1; b=2"], "{}", echo.raw);
    assert_eq!(echo.header("x-custom"), Some("kept"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    // TE is hop-by-hop; ours says that trailers can travel back.
    assert_eq!(echo.header("te"), Some("trailers"));
    assert_eq!(echo.header("via"), Some("1.1 gatehouse"));
    assert_eq!(headers.get("via").unwrap(), "1.1 gatehouse");
    for hop in ["connection", "keep-alive", "transfer-encoding"] {
        assert!(headers.get(hop).is_none(), "{hop} in an HTTP/2 response");
    }
    // The same listener still speaks HTTP/1.1.
    let text = support::client()
        .get(proxy.url("/plain"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(Echo::parse(&text).target, "/plain");
}

#[tokio::test]
async fn bodies_larger_than_every_window_stream_both_ways() {
    // 3 MiB up (the stream window is 256 KiB, the connection's 1 MiB) and 5 MiB back, chunked.
    let up = HttpUpstream::echo().await;
    let big = HttpUpstream::sized(5 * 1024 * 1024, false).await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[limits]\nmax_body_bytes = \"8MiB\"\n\n{}{}{}{}",
        upstream_toml("app", &[up.addr()]),
        upstream_toml("big", &[big.addr()]),
        route_toml("/big", "big"),
        route_toml("/", "app"),
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let data: Vec<u8> = body::blocks(3 * 1024 * 1024)
        .flat_map(|b| b.to_vec())
        .collect();
    let mut sum = support::Checksum::new();
    sum.update(&data);
    // Sent as a stream of unknown length: the HTTP/1.1 side gets it chunked.
    let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = data
        .chunks(100_000)
        .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = Request::builder()
        .method("POST")
        .uri("http://a/upload")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap();
    let (status, _, body, _) = h2s::send(&mut client, req).await;
    assert_eq!(status, 200);
    let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
    assert_eq!(echo.body_len, 3 * 1024 * 1024);
    assert_eq!(echo.body_checksum, sum.hex());
    assert_eq!(echo.header("transfer-encoding"), Some("chunked"));

    let (status, headers, body, _) = h2s::send(&mut client, h2s::get("http://a/big")).await;
    assert_eq!(status, 200);
    assert!(headers.get("content-length").is_none());
    let mut got = support::Checksum::new();
    got.update(&body);
    let mut want = support::Checksum::new();
    for block in body::blocks(5 * 1024 * 1024) {
        want.update(&block);
    }
    assert_eq!((got.len, got.hex()), (want.len, want.hex()));
}

#[tokio::test]
async fn many_streams_at_once_on_one_connection() {
    let up = HttpUpstream::echo().await;
    let proxy = h2c_proxy(up.addr(), "").await;
    let client = h2s::h2c_client(proxy.addr()).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let (status, _, body, _) =
                h2s::send(&mut c, h2s::get(&format!("http://a/n/{i}"))).await;
            assert_eq!(status, 200);
            assert_eq!(
                Echo::parse(std::str::from_utf8(&body).unwrap()).target,
                format!("/n/{i}")
            );
        }));
    }
    for t in tasks {
        within("a concurrent stream", t).await.unwrap();
    }
    let metrics = proxy.metrics().await;
    let streams =
        crate::support::proxy::metric_value(&metrics, "gatehouse_http2_streams_total").unwrap();
    assert!(streams >= 64.0, "{streams}");
}

#[tokio::test]
async fn h2_over_tls_is_chosen_by_alpn_and_http1_still_works() {
    let cert = TestCert::localhost();
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&format!(
        "[log]\naccess = false\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{}\n\
         [[listener]]\nname = \"h1only\"\nlisten = \"127.0.0.1:0\"\nhttp2 = false\n{}\n\n{}{}",
        cert.toml(),
        cert.toml(),
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::tls_h2_client(proxy.addr(), &cert).await;
    let (status, _, body, _) = h2s::send(&mut client, h2s::get("https://localhost/tls")).await;
    assert_eq!(status, 200);
    let echo = Echo::parse(std::str::from_utf8(&body).unwrap());
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("host"), Some("localhost"));

    // A client offering only http/1.1 gets HTTP/1.1 on the same listener.
    let mut tls = h2s::tls_connect(proxy.addr(), &cert, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(b"GET /h1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within("HTTP/1.1 over TLS", tls.read_to_string(&mut text))
        .await
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");

    // No ALPN at all, but the HTTP/2 preface: HTTP/2 still.
    let bare = h2s::tls_connect(proxy.addr(), &cert, &[]).await;
    assert_eq!(bare.get_ref().1.alpn_protocol(), None);
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(bare))
            .await
            .expect("HTTP/2 without ALPN");
    tokio::spawn(conn);
    let (status, _, _, _) = h2s::send(&mut send, h2s::get("https://localhost/bare")).await;
    assert_eq!(status, 200);

    // `http2 = false`: h2 is not offered, the client falls back to http/1.1.
    let h1only = proxy.listener_addr("h1only").unwrap();
    let tls = h2s::tls_connect(h1only, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

/// An HTTP/1.1 upstream that answers every request with a chunked body and trailers, after
/// reading the request (its trailers included) to the end; it reports the request trailers
/// it saw in `x-saw-trailers`.
async fn trailer_upstream() -> HttpUpstream {
    HttpUpstream::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        let mut body = req.into_body();
        let mut saw = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(t) = frame.trailers_ref() {
                for (k, v) in t {
                    saw.push_str(&format!("{k}={};", v.to_str().unwrap_or("?")));
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        let frames = vec![
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"hello "))),
            Ok(hyper::body::Frame::data(Bytes::from_static(b"world"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        hyper::Response::builder()
            .status(200)
            .header("x-saw-trailers", saw)
            .header("trailer", "x-checksum")
            .body(BodyExt::boxed(body))
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn trailers_cross_between_http2_and_http1() {
    let up = trailer_upstream().await;
    let proxy = h2c_proxy(up.addr(), "").await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-request-sum", "42".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"abc"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::builder()
        .method("POST")
        .uri("http://a/t")
        .header("te", "trailers")
        .body(BodyExt::boxed(body))
        .unwrap();
    let (status, headers, body, trailers) = h2s::send(&mut client, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-saw-trailers").unwrap(), "x-request-sum=42;");
    assert_eq!(&body[..], b"hello world");
    let trailers = trailers.expect("response trailers reach the HTTP/2 client");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
}

#[tokio::test]
async fn malformed_requests_get_400_or_a_stream_error_and_reach_no_upstream() {
    let up = HttpUpstream::echo().await;
    let proxy = h2c_proxy(up.addr(), "").await;
    // A Host naming another origin than :authority (RFC 9113 §8.3.1): 400.
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://a.example/")
        .header("host", "b.example")
        .body(())
        .unwrap();
    let (res, _) = send.send_request(req, true).unwrap();
    let res = within("response to a bad Host", res).await.unwrap();
    assert_eq!(res.status(), 400);

    // A connection-specific field is malformed (§8.2.2): h2 resets the stream.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut block = h2s::frames::get_block("a.example", "/bad");
    h2s::frames::literal_named(&mut block, "connection", "close");
    let mut bytes = h2s::frames::preface();
    bytes.extend(h2s::frames::frame(
        h2s::frames::HEADERS,
        h2s::frames::END_STREAM | h2s::frames::END_HEADERS,
        1,
        &block,
    ));
    raw.write_all(&bytes).await.unwrap();
    let seen = h2s::read_frames(&mut raw, Duration::from_secs(10), |f| {
        f.iter().any(|f| {
            f.stream == 1 && (f.kind == h2s::frames::RST_STREAM || f.kind == h2s::frames::HEADERS)
        })
    })
    .await;
    assert!(
        seen.frames
            .iter()
            .any(|f| f.stream == 1 && f.kind == h2s::frames::RST_STREAM),
        "{seen:?}"
    );
    assert_eq!(up.requests(), 0, "a malformed request reached the upstream");
}

#[tokio::test]
async fn drain_sends_goaway_and_lets_the_stream_in_flight_finish() {
    let up = HttpUpstream::delayed(Duration::from_millis(300), "late").await;
    let proxy = h2c_proxy(up.addr(), "").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://a/slow")
        .body(())
        .unwrap();
    let (res, _) = send.send_request(req, true).unwrap();
    up.wait_for_requests(1).await;
    proxy.shutdown();
    let res = within("the response in flight", res).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = within("body", body.data()).await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(text, b"late");
    // The connection then ends: GOAWAY, no streams left.
    within("the connection to end after GOAWAY", driver)
        .await
        .unwrap()
        .unwrap();
    drop(send);
}

#[tokio::test]
async fn a_reload_that_removes_the_listener_closes_its_http2_connections() {
    let up = HttpUpstream::echo().await;
    let tables = format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    );
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[[listener]]\nname = \"extra\"\nlisten = \"127.0.0.1:0\"\nhttp2 = true\n\n{tables}"
    ))
    .await;
    let extra = proxy.listener_addr("extra").unwrap();
    let tcp = tokio::net::TcpStream::connect(extra).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let (res, _) = send
        .send_request(
            http::Request::builder().uri("http://a/").body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(within("first response", res).await.unwrap().status(), 200);
    proxy.rewrite_toml(&format!("{H2C_CONFIG}{tables}"));
    let (status, body) = proxy.reload().await;
    assert_eq!(status, 200, "{body}");
    within("the connection on the removed listener to end", driver)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    let up = HttpUpstream::echo().await;
    let proxy = h2c_proxy(up.addr(), "[timeouts]\nclient_idle = \"200ms\"\n\n").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let (res, _) = send
        .send_request(
            http::Request::builder().uri("http://a/").body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(within("response", res).await.unwrap().status(), 200);
    within("the idle connection to end", driver)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn respond_routes_and_errors_answer_over_http2() {
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[[route]]\npath = \"/fixed\"\nrespond = {{ status = 201, body = \"made\" }}\n\n\
         [upstream.dead]\nservers = [\"{}\"]\n\n{}",
        support::closed_port(),
        route_toml("/dead", "dead")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let (status, headers, body, _) = h2s::send(&mut client, h2s::get("http://a/fixed")).await;
    assert_eq!(status, 201);
    assert_eq!(&body[..], b"made");
    assert_eq!(headers.get("content-length").unwrap(), "4");
    let (status, _, _, _) = h2s::send(&mut client, h2s::get("http://a/none")).await;
    assert_eq!(status, 404);
    let (status, _, body, _) = h2s::send(&mut client, h2s::get("http://a/dead")).await;
    assert_eq!(status, 502, "{:?}", String::from_utf8_lossy(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_reaches_an_http1_upstream() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};

    let echo = crate::websocket::EchoServer::start().await;
    let proxy = h2c_proxy(echo.addr, "").await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    // RFC 8441 §3: a client may use extended CONNECT only once the server's SETTINGS said so;
    // one ordinary exchange first makes sure they have arrived.
    let _ = h2s::send(&mut client, h2s::get("http://a/warm-up")).await;
    let mut req = Request::builder()
        .method("CONNECT")
        .uri("http://a.example/chat")
        .header("sec-websocket-version", "13")
        .body(h2s::empty())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    client.ready().await.unwrap();
    let res = within("extended CONNECT", client.send_request(req))
        .await
        .expect("a response");
    assert_eq!(res.status(), 200, "RFC 8441 §5: 200 opens the WebSocket");
    let upgraded = within("the tunnel", hyper::upgrade::on(res))
        .await
        .expect("an upgraded stream");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    for i in 0..10 {
        let text = format!("over h2 {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let back = within("echo", ws.next())
            .await
            .expect("a message")
            .expect("ok");
        assert_eq!(back, Message::text(text));
    }
    ws.close(None).await.expect("close");
}

/// Runs a command line tool, or `None` when it is not installed (CI installs them; a developer
/// machine may not have them).
async fn run_tool(program: &str, args: Vec<String>) -> Option<String> {
    let name = program.to_owned();
    let output =
        tokio::task::spawn_blocking(move || std::process::Command::new(&name).args(&args).output())
            .await
            .unwrap();
    match output {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        // Not a skip: .ci/run installs curl and nghttp2-client, so a missing tool here is a
        // machine set up wrong, and a test that passed without running would say nothing.
        Err(e) => panic!("running {program}: {e} (install curl and nghttp2-client)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_h2load_speak_http2_to_gatehouse() {
    let cert = TestCert::localhost();
    let up = HttpUpstream::fixed("from upstream").await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n{}\n\n{}{}",
        cert.toml(),
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let h2c = proxy.addr();
    let Some(out) = run_tool(
        "curl",
        vec![
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--http2-prior-knowledge".into(),
            "-w".into(),
            " %{http_version} %{http_code}".into(),
            format!("http://{h2c}/curl"),
        ],
    )
    .await
    else {
        return;
    };
    assert_eq!(out, "from upstream 2 200");
    let tls = proxy.listener_addr("tls").unwrap();
    let out = run_tool(
        "curl",
        vec![
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--http2".into(),
            "--cacert".into(),
            cert.ca_path.clone(),
            "--resolve".into(),
            format!("localhost:{}:127.0.0.1", tls.port()),
            "-w".into(),
            " %{http_version} %{http_code}".into(),
            format!("https://localhost:{}/curl", tls.port()),
        ],
    )
    .await
    .unwrap_or_default();
    assert_eq!(out, "from upstream 2 200");
    // 400 requests, 4 connections, 20 streams at once on each: all must succeed.
    if let Some(out) = run_tool(
        "h2load",
        vec![
            "-n".into(),
            "400".into(),
            "-c".into(),
            "4".into(),
            "-m".into(),
            "20".into(),
            "-T".into(),
            "20".into(),
            format!("http://{h2c}/load"),
        ],
    )
    .await
    {
        assert!(
            out.contains("400 total, 400 started, 400 done, 400 succeeded"),
            "{out}"
        );
    }
}

#[tokio::test]
async fn a_body_that_arrives_whole_is_sent_with_a_length_and_an_empty_one_without() {
    let up = HttpUpstream::echo().await;
    let proxy = h2c_proxy(up.addr(), "").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let echo = |res: http::Response<h2::RecvStream>| async move {
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = within("body", body.data()).await {
            text.extend_from_slice(&chunk.unwrap());
        }
        Echo::parse(std::str::from_utf8(&text).unwrap())
    };
    // One DATA frame with END_STREAM, no content-length.
    let req = http::Request::builder()
        .method("POST")
        .uri("http://a/whole")
        .body(())
        .unwrap();
    let (res, mut body) = send.send_request(req, false).unwrap();
    body.send_data(Bytes::from_static(b"hello"), true).unwrap();
    let e = echo(within("response", res).await.unwrap()).await;
    assert_eq!(e.header("content-length"), Some("5"), "{}", e.raw);
    assert_eq!(e.header("transfer-encoding"), None);
    assert_eq!(e.body_len, 5);
    // A GET whose HEADERS did not end the stream, ended by an empty DATA frame.
    let req = http::Request::builder()
        .uri("http://a/get")
        .body(())
        .unwrap();
    let (res, mut body) = send.send_request(req, false).unwrap();
    body.send_data(Bytes::new(), true).unwrap();
    let e = echo(within("response", res).await.unwrap()).await;
    assert_eq!(e.header("content-length"), None, "{}", e.raw);
    assert_eq!(e.header("transfer-encoding"), None, "{}", e.raw);
}

#[tokio::test]
async fn limits_and_bodiless_responses_hold_over_http2() {
    let up = HttpUpstream::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        if req.uri().path() == "/not-modified" {
            return hyper::Response::builder()
                .status(304)
                .header("etag", "\"x\"")
                .body(BodyExt::boxed(
                    http_body_util::Empty::new().map_err(|never| match never {}),
                ))
                .unwrap();
        }
        http_upstream::text_response(200, "twelve bytes")
    })
    .await;
    let dead = support::closed_port();
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[limits]\nmax_body_bytes = 1000\nmax_header_bytes = \"4KiB\"\n\n\
         [upstream.app]\nservers = [\"{dead}\", \"{}\"]\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    // HEAD: the upstream's Content-Length describes the representation, no body follows.
    let req = Request::builder()
        .method("HEAD")
        .uri("http://a/head")
        .body(h2s::empty())
        .unwrap();
    let (status, headers, body, _) = h2s::send(&mut client, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-length").unwrap(), "12");
    assert!(body.is_empty());
    let (status, headers, body, _) =
        h2s::send(&mut client, h2s::get("http://a/not-modified")).await;
    assert_eq!(status, 304);
    assert_eq!(headers.get("etag").unwrap(), "\"x\"");
    assert!(body.is_empty());
    // The dead server is skipped: every GET lands on the live one.
    for i in 0..6 {
        let (status, _, body, _) = h2s::send(&mut client, h2s::get(&format!("http://a/{i}"))).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"twelve bytes"[..]));
    }
    // A body over the route's limit: 413.
    let req = Request::builder()
        .method("POST")
        .uri("http://a/big")
        .body(h2s::full(vec![b'x'; 5000]))
        .unwrap();
    let (status, _, _, _) = h2s::send(&mut client, req).await;
    assert_eq!(status, 413);
    // Header fields over [limits] max_header_bytes (but under http2.max_header_list_size): 431.
    let req = Request::builder()
        .uri("http://a/")
        .header("x-big", "v".repeat(6000))
        .body(h2s::empty())
        .unwrap();
    let (status, _, _, _) = h2s::send(&mut client, req).await;
    assert_eq!(status, 431);
}
