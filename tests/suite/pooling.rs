//! Upstream connections are pooled and reused, and a pooled connection that died while idle
//! does not fail the next request.

use std::time::Duration;

use crate::support::raw::{RawConn, RawUpstream};
use crate::support::{client, route_toml, upstream_toml, HttpUpstream, Proxy};

/// "1 or very few": sequential requests can only need a second connection when one is handed
/// back to the pool a moment after the next request looked for it.
const FEW: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_on_one_client_connection_reuse_upstream_connections() {
    let up = HttpUpstream::fixed("pooled\n").await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..200 {
        conn.send(format!("GET /p/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        assert_eq!(resp.body_text(), "pooled\n");
    }
    assert_eq!(up.requests(), 200);
    assert!(
        up.connections() <= FEW,
        "200 sequential requests opened {} upstream connections",
        up.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_different_client_connections_share_the_pool() {
    let up = HttpUpstream::fixed("pooled\n").await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    for i in 0..50 {
        // A new client connection each time: the upstream connection must outlive it.
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(
            format!("GET /c/{i} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
    }
    assert_eq!(up.requests(), 50);
    assert!(
        up.connections() <= FEW,
        "50 sequential requests from separate client connections opened {} upstream connections",
        up.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_closed_by_upstream_is_not_an_error() {
    let up = RawUpstream::close_after_response().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let http = client();
    for i in 0..20 {
        // Half the time let the upstream's FIN arrive before the next request (the pool can
        // see the connection is dead); half the time race it (the request must be retried).
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resp = http
            .get(proxy.url(&format!("/stale/{i}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(
            (status, body.as_str()),
            (200, "ok\n"),
            "request {i} after the upstream closed its idle connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_get_their_own_response() {
    // Pooled connections shared across tasks must never cross two exchanges.
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let addr = proxy.addr();
    let mut tasks = Vec::new();
    for t in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::connect(addr).await;
            for i in 0..25 {
                let body = format!("task {t} request {i}");
                conn.send(
                    format!(
                        "POST /t{t}/r{i} HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
                let resp = conn.read_response(false).await;
                assert_eq!(resp.status, 200, "task {t} request {i}: {}", resp.head);
                let echo = crate::support::Echo::parse(&resp.body_text());
                assert_eq!(echo.target, format!("/t{t}/r{i}"));
                assert_eq!(
                    echo.body_checksum,
                    crate::support::Checksum::of(body.as_bytes()).hex()
                );
            }
        }));
    }
    for task in tasks {
        crate::support::within("a concurrent client", task)
            .await
            .expect("client task");
    }
    assert_eq!(up.requests(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_disables_pooling() {
    let up = HttpUpstream::fixed("unpooled\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\nkeepalive = 0\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..10 {
        conn.send(format!("GET /n/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        assert_eq!(conn.read_response(false).await.status, 200, "request {i}");
    }
    assert_eq!(
        up.connections(),
        10,
        "keepalive = 0 keeps no idle connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_after_the_idle_timeout() {
    let up = RawUpstream::fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\ntimeouts = {{ idle = \"300ms\" }}\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let resp = client().get(proxy.url("/")).send().await.expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    // The upstream's serving loop ends when the proxy closes the idle connection. 10 s only
    // keeps the test from hanging if idle connections are never reaped.
    let closed = crate::support::poll_until(Duration::from_secs(10), || async {
        (up.finished() >= 1).then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "the pooled connection outlived its idle timeout"
    );
    assert_eq!(up.connections(), 1);
}

/// Counts the request lines that reached the upstream, pooled or not.
fn request_lines(up: &RawUpstream, method: &str) -> usize {
    up.received_text().matches(&format!("{method} /")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connection_is_retried_once_for_an_idempotent_request() {
    let up = RawUpstream::one_answer_per_connection().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..10 {
        conn.send(format!("GET /r/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        assert_eq!(resp.body_text(), "ok\n");
    }
    // Request 0 opens a connection; every later one first meets the pooled connection, which
    // swallows it, then succeeds on a fresh one: 1 + 2 * 9 request lines on 10 connections.
    assert_eq!(up.connections(), 10);
    assert_eq!(request_lines(&up, "GET"), 19);
    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .contains("gatehouse_upstream_errors_total{upstream=\"app\",kind=\"closed_early\"} 9"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_request_is_never_sent_twice() {
    let up = RawUpstream::one_answer_per_connection().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"POST /first HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(conn.read_response(false).await.status, 200);
    // The pooled connection dies under the second POST: that POST may have been acted on, so
    // it must not be repeated; the client gets 502.
    conn.send(b"POST /second HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(conn.read_response(false).await.status, 502);
    assert_eq!(up.received_text().matches("POST /second").count(), 1);
    assert_eq!(up.connections(), 1);
}
