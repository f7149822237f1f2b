//! Smooth weighted round-robin, counted at the servers.

use crate::support::raw::RawConn;
use crate::support::{route_toml, HttpUpstream, Proxy};

/// Sends `n` sequential GETs over one keep-alive connection, each expecting 200.
async fn send_many(proxy: &Proxy, n: usize) {
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..n {
        conn.send(format!("GET /b/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_one_and_three_split_exactly() {
    let light = HttpUpstream::fixed("light\n").await;
    let heavy = HttpUpstream::fixed("heavy\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\", {{ address = \"{}\", weight = 3 }}]\n\n{}",
        light.addr(),
        heavy.addr(),
        route_toml("/", "app")
    ))
    .await;
    send_many(&proxy, 400).await;
    assert_eq!(
        (light.requests(), heavy.requests()),
        (100, 300),
        "weights 1 and 3 over 400 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_sequence_is_smooth() {
    // Smooth WRR with weights 1 and 3 never sends the light server two requests in a row, and
    // within every window of 4 consecutive requests sends it exactly one.
    let light = HttpUpstream::fixed("light\n").await;
    let heavy = HttpUpstream::fixed("heavy\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 3 }}]\n\n{}",
        light.addr(),
        heavy.addr(),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    let mut sequence = String::new();
    for i in 0..40 {
        conn.send(format!("GET /s/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        let resp = conn.read_response(false).await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.head);
        sequence.push(if resp.body_text() == "light\n" {
            'L'
        } else {
            'H'
        });
    }
    for (i, window) in sequence.as_bytes().windows(4).enumerate() {
        let lights = window.iter().filter(|&&c| c == b'L').count();
        assert_eq!(lights, 1, "window at {i} of {sequence} is not smooth");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_weights_take_turns() {
    let a = HttpUpstream::fixed("a\n").await;
    let b = HttpUpstream::fixed("b\n").await;
    let c = HttpUpstream::fixed("c\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\", \"{}\", \"{}\"]\n\n{}",
        a.addr(),
        b.addr(),
        c.addr(),
        route_toml("/", "app")
    ))
    .await;
    send_many(&proxy, 300).await;
    assert_eq!((a.requests(), b.requests(), c.requests()), (100, 100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_moves_on_to_another_server() {
    // proxy.rs: a failed connect is always safe to try elsewhere.
    let good = HttpUpstream::fixed("good\n").await;
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"{}\", \"{}\"]\n\n{}",
        crate::support::closed_port(),
        good.addr(),
        route_toml("/", "app")
    ))
    .await;
    send_many(&proxy, 20).await;
    assert_eq!(good.requests(), 20);
}
