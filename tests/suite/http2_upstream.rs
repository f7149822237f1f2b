//! Upstreams that speak HTTP/2 (`protocol = "h2c"`): one multiplexed connection shared by every
//! client, trailers end to end, a GOAWAY from the server moving new requests to a fresh
//! connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;

use crate::support::h2::{self as h2s, H2Upstream, H2C_CONFIG};
use crate::support::http_upstream::Body;
use crate::support::{self, route_toml, within, Proxy};

fn h2c_upstream_toml(addr: std::net::SocketAddr) -> String {
    format!("[upstream.app]\nservers = [\"{addr}\"]\nprotocol = \"h2c\"\n\n")
}

/// Answers with the request's method, path and headers (one `name: value` line each) as the
/// body, after reading the request body; request trailers are reported in `x-saw-trailers`,
/// and the response ends with a `grpc-status: 0` trailer.
async fn echo_h2(req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut len = 0;
    let mut saw = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            len += d.len();
        }
        if let Some(t) = frame.trailers_ref() {
            for (k, v) in t {
                saw.push_str(&format!("{k}={};", v.to_str().unwrap_or("?")));
            }
        }
    }
    let mut text = format!(
        "{} {} {:?} len={len}\n",
        parts.method, parts.uri, parts.version
    );
    for (k, v) in &parts.headers {
        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames = vec![
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(text))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    hyper::Response::builder()
        .status(200)
        .header("x-saw-trailers", saw)
        .body(BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap()
}

#[tokio::test]
async fn every_client_shares_one_multiplexed_connection_to_an_h2c_upstream() {
    let up = H2Upstream::start(echo_h2).await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}{}{}",
        h2c_upstream_toml(up.addr()),
        route_toml("/", "app")
    ))
    .await;
    let mut tasks = Vec::new();
    for c in 0..4 {
        let client = h2s::h2c_client(proxy.addr()).await;
        for i in 0..16 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::builder()
                    .uri(format!("http://app.example/c{c}/r{i}?x=1"))
                    .header("x-custom", "kept")
                    .body(h2s::empty())
                    .unwrap();
                let (status, headers, body, trailers) = h2s::send(&mut client, req).await;
                assert_eq!(status, 200);
                let text = String::from_utf8(body.to_vec()).unwrap();
                assert!(
                    text.starts_with(&format!("GET http://app.example/c{c}/r{i}?x=1 HTTP/2.0")),
                    "{text}"
                );
                assert!(text.contains("\nx-custom: kept\n"), "{text}");
                assert!(text.contains("\nx-forwarded-for: 127.0.0.1\n"), "{text}");
                assert!(text.contains("\nx-forwarded-proto: http\n"), "{text}");
                assert!(text.contains("\nvia: 2 gatehouse\n"), "{text}");
                assert_eq!(headers.get("via").unwrap(), "2 gatehouse");
                assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
            }));
        }
    }
    for t in tasks {
        within("a request to the h2c upstream", t).await.unwrap();
    }
    assert_eq!(up.requests(), 64);
    assert_eq!(up.connections(), 1, "one connection carries every request");
}

#[tokio::test]
async fn request_and_response_trailers_pass_end_to_end() {
    let up = H2Upstream::start(echo_h2).await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}{}{}",
        h2c_upstream_toml(up.addr()),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", "7".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"12345"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let req = Request::builder()
        .method("POST")
        .uri("http://a/t")
        .header("te", "trailers")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        )))
        .unwrap();
    let (status, headers, body, trailers) = h2s::send(&mut client, req).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-saw-trailers").unwrap(), "x-sum=7;");
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("len=5"), "{text}");
    assert!(
        text.contains("\nte: trailers\n"),
        "gRPC needs te: trailers: {text}"
    );
    assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
}

/// An h2c server (the h2 crate, for exact control) that serves one request per connection,
/// then says GOAWAY. The response body names the connection.
async fn one_request_per_connection() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                if let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let res = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut send) = respond.send_response(res, false) {
                        let _ = send.send_data(Bytes::from(format!("conn {n}")), true);
                    }
                }
                conn.graceful_shutdown();
                while let Some(Ok(_)) = conn.accept().await {}
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_goaway_from_the_upstream_moves_new_requests_to_a_fresh_connection() {
    let (addr, connections) = one_request_per_connection().await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}{}{}",
        h2c_upstream_toml(addr),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    for i in 1..=3 {
        let (status, _, body, _) = h2s::send(&mut client, h2s::get("http://a/")).await;
        assert_eq!(
            status,
            200,
            "request {i}: {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(connections.load(Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn an_h2c_upstream_that_is_down_is_a_502() {
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}{}{}",
        h2c_upstream_toml(support::closed_port()),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let (status, _, _, _) = h2s::send(&mut client, h2s::get("http://a/")).await;
    assert_eq!(status, 502);
    let res = support::client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(res.status(), 502);
}

#[tokio::test]
async fn http1_clients_reach_an_h2c_upstream_too() {
    let up = H2Upstream::start(echo_h2).await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}{}{}",
        h2c_upstream_toml(up.addr()),
        route_toml("/", "app")
    ))
    .await;
    let client = support::client();
    for i in 0..3 {
        let res = client
            .get(proxy.url(&format!("/h1/{i}")))
            .header("x-custom", "kept")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers().get("via").unwrap(), "2 gatehouse");
        let text = res.text().await.unwrap();
        assert!(text.contains(&format!("/h1/{i} HTTP/2.0 len=0")), "{text}");
        assert!(text.contains("\nx-custom: kept\n"), "{text}");
        assert!(text.contains("\nx-forwarded-for: 127.0.0.1\n"), "{text}");
        assert!(!text.contains("\nconnection:"), "{text}");
    }
    // A body of unknown length (chunked) streams up as DATA frames.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..50).map(|_| Ok(vec![b'z'; 10_000])).collect();
    let res = client
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(text.contains("len=500000"), "{text}");
    assert_eq!(
        up.connections(),
        1,
        "HTTP/1.1 and HTTP/2 clients share the connection"
    );
}

#[tokio::test]
async fn an_unused_upstream_connection_is_closed_after_its_idle_timeout() {
    let up = H2Upstream::start(echo_h2).await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[upstream.app]\nservers = [\"{}\"]\nprotocol = \"h2c\"\n\
         timeouts = {{ idle = \"100ms\" }}\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let (status, _, _, _) = h2s::send(&mut client, h2s::get("http://a/1")).await;
    assert_eq!(status, 200);
    let closed = support::poll_until(support::STEP_TIMEOUT, || async {
        (up.closed() >= 1).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the idle connection was never closed");
    // The next request opens a fresh one.
    let (status, _, _, _) = h2s::send(&mut client, h2s::get("http://a/2")).await;
    assert_eq!(status, 200);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn http_health_checks_of_an_h2c_upstream_speak_http2() {
    // One server answers its health path, the other fails it; only the first takes requests.
    let good = H2Upstream::start(|_req| async {
        crate::support::http_upstream::text_response(200, "good")
    })
    .await;
    let bad = H2Upstream::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        let status = if req.uri().path() == "/healthz" {
            503
        } else {
            200
        };
        crate::support::http_upstream::text_response(status, "bad")
    })
    .await;
    let proxy = Proxy::start_toml(&format!(
        "{H2C_CONFIG}[upstream.app]\nservers = [\"{}\", \"{}\"]\nprotocol = \"h2c\"\n\
         health_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\", fall = 1, rise = 1 }}\n\n{}",
        good.addr(),
        bad.addr(),
        route_toml("/", "app")
    ))
    .await;
    let down = support::poll_until(support::STEP_TIMEOUT, || async {
        let (_, body) = proxy.admin_get("/upstreams").await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let servers = json["upstreams"][0]["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let state = |addr: std::net::SocketAddr| {
            servers
                .iter()
                .find(|s| s["address"] == addr.to_string())
                .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
        };
        (state(bad.addr()).as_deref() == Some("unhealthy")
            && state(good.addr()).as_deref() == Some("healthy"))
        .then_some(())
    })
    .await;
    assert!(down.is_some(), "the checks never told the servers apart");
    let mut client = h2s::h2c_client(proxy.addr()).await;
    for _ in 0..6 {
        let (status, _, body, _) = h2s::send(&mut client, h2s::get("http://a/")).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"good"[..]));
    }
    assert!(bad.requests() >= 1, "the bad server was checked");
}
