//! Request smuggling: every ambiguous or malformed framing is refused with 400 (or 501 for an
//! unknown transfer coding), nothing of it reaches the upstream, and the connection is closed so
//! that bytes after it cannot be read as a second request.
//!
//! Each case is sent over raw TCP with a second request pipelined behind it
//! (`GET /smuggled`); a recording upstream keeps every byte it receives. After the rejection a
//! well-formed control request must reach the same upstream, which shows the wiring works and
//! that "received nothing" means something.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::support::raw::{self, RawConn, RawUpstream};
use crate::support::{route_toml, upstream_toml, Proxy};

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";

async fn recording_proxy() -> (RawUpstream, Proxy) {
    let up = RawUpstream::recording().await;
    let proxy = Proxy::start(&format!(
        "[timeouts]\nclient_header = \"2s\"\nclient_body = \"2s\"\n\n{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    (up, proxy)
}

/// Sends `bad` followed by a pipelined request and checks the rejection.
async fn assert_refused(bad: &str, allowed: &[u16]) {
    let (up, proxy) = recording_proxy().await;
    let mut request = bad.as_bytes().to_vec();
    request.extend_from_slice(SMUGGLED.as_bytes());
    let ex = raw::send(proxy.addr(), &request).await;
    let text = ex.text();
    assert!(
        ex.status().is_some_and(|s| allowed.contains(&s)),
        "request {bad:?}: expected one of {allowed:?}, got {text:?} ({:?})",
        ex.ending
    );
    assert!(
        !ex.body().trim().is_empty(),
        "request {bad:?}: the {:?} has no text body: {text:?}",
        ex.status()
    );
    assert_eq!(
        ex.response_count(),
        1,
        "request {bad:?}: the pipelined request was answered: {text:?}"
    );
    assert!(
        ex.closed(),
        "request {bad:?}: connection left open after the rejection: {text:?}"
    );

    // The control request proves the upstream is reachable; once it has arrived, anything the
    // bad request let through would have arrived before it (same proxy, earlier in time).
    let control = raw::send(
        proxy.addr(),
        b"GET /control HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(control.status(), Some(200), "control: {:?}", control.text());
    assert!(up.wait_for("GET /control", Duration::from_secs(5)).await);
    let received = up.received_text();
    let before_control = received.split("GET /control").next().unwrap_or_default();
    assert!(
        before_control.is_empty(),
        "request {bad:?}: the upstream received {before_control:?}"
    );
    assert!(
        !received.contains("/smuggled"),
        "request {bad:?}: the smuggled request reached the upstream: {received:?}"
    );
}

async fn assert_400(bad: &str) {
    assert_refused(bad, &[400]).await;
}

// Framing: Content-Length and Transfer-Encoding (RFC 9112 §6.1, §6.3).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding() {
    assert_400(
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_400(
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_differing_content_lengths() {
    assert_400(
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 6\r\n\r\nhello!").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_content_length() {
    for value in ["12a", "-1", "+5", "1 2", "0x5", ""] {
        assert_400(&format!(
            "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: {value}\r\n\r\nhello"
        ))
        .await;
    }
    // Too large for any integer type: malformed, or at least over every body limit.
    assert_refused(
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
        &[400, 413],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_before_colon_in_a_header_name() {
    // RFC 9112 §5.1: a server MUST reject whitespace between a field name and the colon.
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length : 5\r\n\r\nhello").await;
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_other_than_chunked() {
    for value in [
        "gzip",
        "identity",
        "chunked, gzip",
        "gzip, chunked",
        "xchunked",
    ] {
        assert_refused(
            &format!(
                "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: {value}\r\n\r\n0\r\n\r\n"
            ),
            &[400, 501],
        )
        .await;
    }
}

// Chunked body syntax (RFC 9112 §7.1).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_size() {
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_line_without_crlf_or_with_a_sign() {
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n")
        .await;
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n")
        .await;
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_chunk_size() {
    assert_400(
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crlf_after_chunk_data() {
    assert_400(
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    )
    .await;
}

// Header syntax (RFC 9112 §5.2, RFC 9110 §5.5).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold() {
    assert_400("GET / HTTP/1.1\r\nHost: a.test\r\nX-Folded: one\r\n two\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\r\nHost: a.test\r\nX-Folded: one\r\n\ttwo\r\n\r\n").await;
    // A fold that would hide a Content-Length from a parser that ignores it.
    assert_400("POST / HTTP/1.1\r\nHost: a.test\r\nX-Folded: x\r\n Content-Length: 5\r\n\r\nhello")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_or_bare_cr_in_a_header_value() {
    assert_400("GET / HTTP/1.1\r\nHost: a.test\r\nX-Nul: a\0b\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\r\nHost: a.test\r\nX-Cr: a\rb\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_inside_the_head() {
    assert_400("GET / HTTP/1.1\r\nHost: a.test\nX-After-Lf: b\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\nHost: a.test\r\n\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_host() {
    assert_400("GET / HTTP/1.1\r\nHost: a b\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\r\nHost: exa mple\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n").await;
    assert_400("GET / HTTP/1.1\r\nX-No-Host: yes\r\n\r\n").await;
}

/// Weaker than "nothing reaches the upstream", and what matters most once a body is streamed:
/// when a framing error is found after part of the body went upstream, that upstream exchange
/// is abandoned (its connection closed, never pooled) and nothing after the error is forwarded.
/// Sent in one write, and split so that the good first chunk is surely relayed before the bad
/// second one arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_error_mid_body_abandons_the_upstream_connection() {
    let good_part =
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let bad_part = format!("5\r\nworldXX0\r\n\r\n{SMUGGLED}");
    for split in [false, true] {
        let (up, proxy) = recording_proxy().await;
        let ex = if split {
            let mut conn = RawConn::connect(proxy.addr()).await;
            conn.send(good_part.as_bytes()).await;
            // Not a timing assertion: only makes it likely that the first chunk has gone
            // upstream before the rest arrives, which is the case under test.
            let _ = up.wait_for("hello", Duration::from_secs(2)).await;
            let _ = conn.stream.write_all(bad_part.as_bytes()).await;
            conn.read_to_end(Duration::from_secs(10)).await
        } else {
            raw::send(proxy.addr(), format!("{good_part}{bad_part}").as_bytes()).await
        };
        assert_eq!(ex.status(), Some(400), "split {split}: {:?}", ex.text());
        assert_eq!(ex.response_count(), 1, "split {split}: {:?}", ex.text());
        assert!(ex.closed(), "split {split}: {:?}", ex.text());
        if !up.received().is_empty() {
            let closed = crate::support::poll_until(Duration::from_secs(10), || async {
                (up.finished() >= up.connections()).then_some(())
            })
            .await;
            assert!(
                closed.is_some(),
                "split {split}: the upstream connection that carried part of the bad body is \
                 still open: {:?}",
                up.received_text()
            );
        }
        let received = up.received_text();
        assert!(
            !received.contains("XX") && !received.contains("/smuggled"),
            "split {split}: bytes after the framing error reached the upstream: {received:?}"
        );
        // A last-chunk would tell the upstream the (truncated) request is complete.
        assert!(
            !received.contains("\r\n0\r\n\r\n"),
            "split {split}: the upstream received a complete chunked body: {received:?}"
        );
    }
}
