//! WebSocket and other HTTP/1.1 upgrades: the 101 handshake is proxied, then the connection is a
//! tunnel both ways with its own idle limit; `Upgrade: h2c` never goes upstream.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::support::raw::{self, RawUpstream};
use crate::support::{poll_until, route_toml, within, HttpUpstream, Proxy};

/// A WebSocket echo server on 127.0.0.1:0 (tokio-tungstenite), answering every text or binary
/// message with the same message. Aborted on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoServer { addr, task }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(echo: &EchoServer, extra: &str) -> String {
    format!(
        "{extra}[upstream.ws]\nservers = [\"{}\"]\n\n{}",
        echo.addr,
        route_toml("/", "ws")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_pass_both_ways() {
    let echo = EchoServer::start().await;
    let proxy = Proxy::start(&config(&echo, "")).await;
    let (mut ws, response) = within(
        "WebSocket handshake through the proxy",
        tokio_tungstenite::connect_async(format!("ws://{}/chat", proxy.addr())),
    )
    .await
    .expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers().get("via").and_then(|v| v.to_str().ok()),
        Some("1.1 gatehouse")
    );
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let back = within("echo", ws.next())
            .await
            .expect("a message")
            .expect("ok");
        assert_eq!(back, Message::text(text));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone()))
        .await
        .expect("send binary");
    let back = within("binary echo", ws.next())
        .await
        .expect("a message")
        .expect("ok");
    assert_eq!(back.into_data().to_vec(), blob);
    ws.close(None).await.expect("close");
    drop(ws);
    // The exchange is logged and counted once the tunnel has closed on both sides.
    let counted = poll_until(Duration::from_secs(10), || async {
        let metrics = proxy.metrics().await;
        metrics
            .contains("gatehouse_requests_total{route=\"route1\",class=\"1xx\"} 1")
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "{}", proxy.metrics().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_tunnel_idle() {
    let echo = EchoServer::start().await;
    let proxy = Proxy::start(&config(&echo, "[timeouts]\ntunnel_idle = \"300ms\"\n\n")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr()))
        .await
        .expect("handshake");
    ws.send(Message::text("still here")).await.expect("send");
    assert!(within("echo", ws.next()).await.is_some());
    // Now silence: the proxy closes the tunnel, and the client sees its connection end.
    let ended = within("the idle tunnel to close", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let () = ended;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_survives_a_reload() {
    let echo = EchoServer::start().await;
    let proxy = Proxy::start(&config(&echo, "")).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr()))
        .await
        .expect("handshake");
    ws.send(Message::text("before")).await.expect("send");
    assert_eq!(
        within("echo", ws.next()).await.expect("msg").expect("ok"),
        Message::text("before")
    );
    for i in 0..5 {
        proxy.rewrite(&config(
            &echo,
            &format!("[timeouts]\nclient_idle = \"{}s\"\n\n", 60 + i),
        ));
        let (status, report) = proxy.reload().await;
        assert_eq!(status, 200, "{report}");
        let text = format!("after reload {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        assert_eq!(
            within("echo", ws.next()).await.expect("msg").expect("ok"),
            Message::text(text)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_never_passed_upstream() {
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let exchange = raw::send(
        proxy.addr(),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(exchange.status(), Some(200), "{}", exchange.text());
    let echo = crate::support::Echo::parse(&exchange.body());
    assert_eq!(echo.header("upgrade"), None, "{}", echo.raw);
    assert_eq!(echo.header("http2-settings"), None, "{}", echo.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_nobody_asked_for_is_a_502() {
    let up = RawUpstream::fixed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let exchange = raw::send(
        proxy.addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(exchange.status(), Some(502), "{}", exchange.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_refuses_is_an_ordinary_response() {
    let up =
        RawUpstream::fixed(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\"]\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ))
    .await;
    let exchange = raw::send(
        proxy.addr(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(exchange.status(), Some(426), "{}", exchange.text());
    let seen = poll_until(Duration::from_secs(5), || async {
        let text = up.received_text();
        text.contains("\r\n\r\n").then_some(text)
    })
    .await
    .expect("the upstream saw the request");
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains("connection: upgrade\r\n"), "{seen}");
    assert!(
        !lower.contains("close"),
        "the client's close is for its own hop: {seen}"
    );
    assert!(lower.contains("upgrade: websocket\r\n"), "{seen}");
    assert!(
        lower.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
        "{seen}"
    );
}
