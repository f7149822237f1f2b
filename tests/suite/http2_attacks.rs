//! The known HTTP/2 attacks, sent as raw frames: each must end in GOAWAY or a closed connection
//! with a bounded number of requests reaching the upstream (counted at the backend), and the
//! proxy must keep serving other clients afterwards.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::backend::{Backend, Mode};
use crate::support::h2::frames::{self, frame};
use crate::support::h2::{self as h2s, H2C_CONFIG};
use crate::support::proxy::metric_value;
use crate::support::{self, route_toml, upstream_toml, HttpUpstream, Proxy};

/// How long an attack may take to be stopped before the test fails.
const STOPPED_WITHIN: Duration = Duration::from_secs(20);

async fn proxy_for(backend: std::net::SocketAddr, http2: &str) -> Proxy {
    Proxy::start_toml(&format!(
        "{H2C_CONFIG}[http2]\n{http2}\n{}{}",
        upstream_toml("app", &[backend]),
        route_toml("/", "app")
    ))
    .await
}

/// The proxy still answers a well-behaved HTTP/2 client and an HTTP/1.1 one.
async fn still_serves(proxy: &Proxy) {
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let (status, _, _, _) = h2s::send(&mut client, h2s::get("http://a/after")).await;
    assert_eq!(status, 200);
    let res = support::client()
        .get(proxy.url("/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

async fn abuse(proxy: &Proxy, reason: &str) -> f64 {
    let metrics = proxy.metrics().await;
    metric_value(
        &metrics,
        &format!("gatehouse_http2_abuse_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Writes `attack` while another task reads (the proxy answers PINGs and SETTINGS, and must
/// not block on a client that does not read), until the proxy closes or the time is up.
async fn run_attack(proxy: &Proxy, attack: Vec<u8>) -> h2s::Seen {
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let reader =
        tokio::spawn(async move { h2s::read_until_closed(&mut read, STOPPED_WITHIN).await });
    for piece in attack.chunks(16 * 1024) {
        // The proxy may close before the attack is all written.
        if write.write_all(piece).await.is_err() {
            break;
        }
    }
    let seen = reader.await.unwrap();
    drop(write);
    seen
}

fn headers_get(stream: u32, path: &str) -> Vec<u8> {
    frame(
        frames::HEADERS,
        frames::END_STREAM | frames::END_HEADERS,
        stream,
        &frames::get_block("a.example", path),
    )
}

fn rapid_reset(streams: u32) -> Vec<u8> {
    let mut attack = frames::preface();
    for i in 0..streams {
        let id = 2 * i + 1;
        attack.extend(headers_get(id, "/r"));
        attack.extend(frame(frames::RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    attack
}

#[tokio::test]
async fn rapid_reset_ends_in_goaway_with_bounded_upstream_work() {
    let backend = Backend::start("b").await;
    backend.set_mode(Mode::Slow(Duration::from_millis(200)));
    let proxy = proxy_for(backend.addr(), "").await;
    let seen = run_attack(&proxy, rapid_reset(5000)).await;
    assert_eq!(
        seen.goaway(),
        Some(frames::ENHANCE_YOUR_CALM),
        "{:?}",
        seen.frames.last()
    );
    assert!(seen.closed);
    // At most the reset allowance twice over (the rule is "more than half reset") plus one
    // window of concurrent streams can have started.
    assert!(
        backend.requests() <= 2 * 100 + 100,
        "{} requests reached the backend",
        backend.requests()
    );
    backend.set_mode(Mode::Ok);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn rapid_reset_of_accepted_streams_is_caught_by_our_own_counter() {
    // h2's guard counts only streams reset before we accepted them; with it out of the way,
    // the per-connection reset counter must end the connection.
    let backend = Backend::start("b").await;
    backend.set_mode(Mode::Hang);
    let proxy = proxy_for(
        backend.addr(),
        "max_pending_resets = 100000\nmax_client_resets = 50\n",
    )
    .await;
    let seen = run_attack(&proxy, rapid_reset(5000)).await;
    assert_eq!(seen.goaway(), Some(frames::ENHANCE_YOUR_CALM));
    assert_eq!(abuse(&proxy, "resets").await, 1.0);
    assert!(
        backend.requests() <= 2 * 50 + 100,
        "{} requests reached the backend",
        backend.requests()
    );
    backend.set_mode(Mode::Ok);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn ping_flood_ends_in_goaway() {
    let backend = Backend::start("b").await;
    let proxy = proxy_for(backend.addr(), "max_control_frames = 200\n").await;
    let mut attack = frames::preface();
    for i in 0..5000u64 {
        attack.extend(frame(frames::PING, 0, 0, &i.to_be_bytes()));
    }
    let seen = run_attack(&proxy, attack).await;
    assert_eq!(seen.goaway(), Some(frames::ENHANCE_YOUR_CALM));
    let pongs = seen
        .frames
        .iter()
        .filter(|f| f.kind == frames::PING)
        .count();
    assert!(pongs < 5000, "every PING was answered: {pongs}");
    assert_eq!(abuse(&proxy, "control_frames").await, 1.0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn settings_flood_ends_in_goaway() {
    let backend = Backend::start("b").await;
    let proxy = proxy_for(backend.addr(), "max_control_frames = 200\n").await;
    let mut attack = frames::preface();
    for _ in 0..5000 {
        attack.extend(frame(frames::SETTINGS, 0, 0, &[]));
    }
    let seen = run_attack(&proxy, attack).await;
    assert_eq!(seen.goaway(), Some(frames::ENHANCE_YOUR_CALM));
    still_serves(&proxy).await;
}

#[tokio::test]
async fn empty_data_flood_ends_in_goaway() {
    let backend = Backend::start("b").await;
    backend.set_mode(Mode::Hang);
    let proxy = proxy_for(backend.addr(), "").await;
    let mut block = frames::get_block("a.example", "/upload");
    // :method POST is static-table entry 3; replace GET (0x82).
    block[0] = 0x83;
    let mut attack = frames::preface();
    attack.extend(frame(frames::HEADERS, frames::END_HEADERS, 1, &block));
    for _ in 0..10_000 {
        attack.extend(frame(frames::DATA, 0, 1, &[]));
    }
    let seen = run_attack(&proxy, attack).await;
    assert_eq!(seen.goaway(), Some(frames::ENHANCE_YOUR_CALM));
    assert!(backend.requests() <= 1);
    backend.set_mode(Mode::Ok);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn continuation_flood_is_cut_off_without_reaching_the_upstream() {
    let backend = Backend::start("b").await;
    let proxy = proxy_for(backend.addr(), "max_header_list_size = \"16KiB\"\n").await;
    let mut attack = frames::preface();
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
    attack.extend(frame(
        frames::HEADERS,
        frames::END_STREAM,
        1,
        &frames::get_block("a.example", "/c"),
    ));
    for i in 0..20_000 {
        let mut piece = Vec::new();
        frames::literal_named(&mut piece, &format!("x-c{i}"), &"v".repeat(100));
        attack.extend(frame(frames::CONTINUATION, 0, 1, &piece));
    }
    let seen = run_attack(&proxy, attack).await;
    assert!(
        seen.closed && seen.goaway().is_some(),
        "the connection must end with GOAWAY: {:?}",
        seen.frames.last()
    );
    assert_eq!(backend.requests(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn hpack_bomb_is_refused_without_reaching_the_upstream() {
    let backend = Backend::start("b").await;
    let proxy = proxy_for(backend.addr(), "").await;
    // One 4000-byte value put in the dynamic table (literal with incremental indexing,
    // RFC 7541 §6.2.1), then referenced 2000 times at one byte each: 8 MB decoded from 6 KB.
    let mut block = frames::get_block("a.example", "/bomb");
    block.push(0x40);
    block.push(6);
    block.extend_from_slice(b"x-bomb");
    block.push(0x7f);
    let mut n = 4000 - 127;
    while n >= 128 {
        block.push((n % 128 + 128) as u8);
        n /= 128;
    }
    block.push(n as u8);
    block.extend(std::iter::repeat_n(b'a', 4000));
    for _ in 0..2000 {
        // Indexed field: dynamic entry 62 (the static table has 61).
        block.push(0x80 | 62);
    }
    let mut attack = frames::preface();
    attack.extend(frame(
        frames::HEADERS,
        frames::END_STREAM | frames::END_HEADERS,
        1,
        &block,
    ));
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut tcp = tcp;
    tcp.write_all(&attack).await.unwrap();
    // The stream is answered with 431 and reset, or the connection is closed: either way,
    // nothing is forwarded.
    let seen = h2s::read_frames(&mut tcp, STOPPED_WITHIN, |f| {
        f.iter()
            .any(|f| (f.stream == 1 && f.kind == frames::RST_STREAM) || f.kind == frames::GOAWAY)
    })
    .await;
    assert!(
        seen.closed
            || seen
                .frames
                .iter()
                .any(|f| f.kind == frames::RST_STREAM || f.kind == frames::GOAWAY),
        "{:?}",
        seen.frames
    );
    assert_eq!(backend.requests(), 0);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn made_you_reset_ends_in_goaway() {
    // CVE-2025-8671: frames that make the server reset streams itself (more DATA than the
    // stream's content-length is a stream error, RFC 9113 §8.1.1). h2's local reset limit
    // ends the connection.
    let backend = Backend::start("b").await;
    backend.set_mode(Mode::Hang);
    let proxy = proxy_for(backend.addr(), "max_local_error_resets = 50\n").await;
    let mut attack = frames::preface();
    let mut block = frames::get_block("a.example", "/m");
    block[0] = 0x83; // :method POST
    frames::literal_high(&mut block, 28, "1"); // content-length is static entry 28
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        attack.extend(frame(frames::HEADERS, frames::END_HEADERS, id, &block));
        attack.extend(frame(frames::DATA, frames::END_STREAM, id, b"xx"));
    }
    let seen = run_attack(&proxy, attack).await;
    assert_eq!(seen.goaway(), Some(frames::ENHANCE_YOUR_CALM));
    assert!(
        backend.requests() <= 50 + 100,
        "{} requests reached the backend",
        backend.requests()
    );
    backend.set_mode(Mode::Ok);
    still_serves(&proxy).await;
}

#[tokio::test]
async fn a_zero_window_reader_is_reset_and_its_connection_closed() {
    let big = HttpUpstream::sized(4 * 1024 * 1024, true).await;
    let proxy = proxy_for(big.addr(), "send_timeout = \"300ms\"\n").await;
    let mut attack = gatehouse::http2::PREFACE.to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 0: we accept no DATA at all, and never say more.
    let mut setting = vec![0, 4];
    setting.extend_from_slice(&0u32.to_be_bytes());
    attack.extend(frame(frames::SETTINGS, 0, 0, &setting));
    attack.extend(headers_get(1, "/big"));
    let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(&attack).await.unwrap();
    let seen = h2s::read_until_closed(&mut tcp, STOPPED_WITHIN).await;
    assert!(
        seen.closed,
        "the connection was left open: {:?}",
        seen.frames
    );
    // The stalled stream is reset and the connection goes away at once: the reset may not
    // get out before the GOAWAY, and need not.
    assert_eq!(
        seen.goaway(),
        Some(frames::ENHANCE_YOUR_CALM),
        "{:?}",
        seen.frames
    );
    assert_eq!(abuse(&proxy, "send_timeout").await, 1.0);
    let mut client = h2s::h2c_client(proxy.addr()).await;
    let (status, _, body, _) = h2s::send(&mut client, h2s::get("http://a/big")).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 4 * 1024 * 1024);
}

#[tokio::test]
async fn a_paused_stream_is_reset_but_a_connection_that_reads_others_stays() {
    let big = HttpUpstream::sized(2 * 1024 * 1024, true).await;
    let proxy = proxy_for(big.addr(), "send_timeout = \"300ms\"\n").await;
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::builder()
            .uri(format!("http://a{path}"))
            .body(())
            .unwrap()
    };
    // Stream A: its window is never opened again after the first 16 KiB.
    let (paused, _) = send.send_request(get("/paused"), true).unwrap();
    let paused = support::within("paused response", paused).await.unwrap();
    let mut paused = paused.into_body();
    // Meanwhile other streams are read to their end, one after another, until A is reset.
    let mut reset = false;
    for _ in 0..200 {
        let (res, _) = send.send_request(get("/read"), true).unwrap();
        let mut body = support::within("response", res).await.unwrap().into_body();
        while let Some(chunk) = support::within("body", body.data()).await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        // Take what A got without giving its window back.
        while let Some(Some(chunk)) = futures_util::FutureExt::now_or_never(paused.data()) {
            if chunk.is_err() {
                reset = true;
                break;
            }
        }
        if reset {
            break;
        }
    }
    assert!(reset, "the paused stream was never reset");
    assert_eq!(abuse(&proxy, "send_timeout").await, 0.0);
    // The connection still serves.
    let (res, _) = send.send_request(get("/after"), true).unwrap();
    assert_eq!(support::within("after", res).await.unwrap().status(), 200);
}

#[tokio::test]
async fn streams_past_max_concurrent_streams_are_refused() {
    let backend = Backend::start("b").await;
    backend.set_mode(Mode::Hang);
    let proxy = proxy_for(backend.addr(), "max_concurrent_streams = 2\n").await;
    let mut attack = frames::preface();
    for id in [1, 3, 5] {
        attack.extend(headers_get(id, "/held"));
    }
    let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(&attack).await.unwrap();
    // RFC 9113 §5.1.2: a stream over the announced limit is refused (REFUSED_STREAM, 0x7),
    // so the client knows it was never processed and may retry it.
    let seen = h2s::read_frames(&mut tcp, STOPPED_WITHIN, |f| {
        f.iter().any(|f| f.kind == frames::RST_STREAM)
    })
    .await;
    let reset: Vec<_> = seen
        .frames
        .iter()
        .filter(|f| f.kind == frames::RST_STREAM)
        .collect();
    assert_eq!(reset.len(), 1, "{:?}", seen.frames);
    assert_eq!((reset[0].stream, reset[0].code), (5, Some(0x7)));
    backend.wait_until(|b| b.requests() >= 2).await;
    assert_eq!(
        backend.requests(),
        2,
        "only the two admitted streams reached the backend"
    );
    backend.set_mode(Mode::Ok);
    still_serves(&proxy).await;
}
