//! Active health checks: each upstream that has a `health_check` gets one task that probes every
//! one of its servers each `interval` and feeds the verdicts to the server's state.
//!
//! Neighbours: `app.rs` spawns `run` for each upstream with a `health_check`; the config
//! (`config/compile.rs`) has already resolved the defaults and made sure `timeout <= interval`;
//! `upstream::state` turns the stream of results into up/down (`record_check` owns the rise/fall
//! streaks and starts slow start on recovery); `upstream::select` then leaves down servers out.
//! The HTTP probe reads its answer with the proxy's own parser (`http1::response`), so a server
//! that the proxy could not talk to does not pass its check either.
//!
//! Why: passive health (outlier ejection) only learns that a server is broken by sending it real
//! requests, and only learns that it is back by sending it more. nginx OSS has nothing else; an
//! active check finds a dead server before a client does and brings it back without risking one.
//! The semantics are HAProxy's: `fall` failures in a row take a server down, `rise` successes in a
//! row bring it back, so one lost probe neither ejects a server nor one lucky probe restores it.
//! Servers start healthy: a proxy that has just started (or reloaded) must not refuse traffic
//! until the first checks have come back.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::state::CheckTransition;
use super::targets::Server;
use super::Dial;
use crate::config::snapshot::{HealthCheckKind, HealthCheckSettings, StatusSet, Upstream};
use crate::http1::response;
use crate::metrics::UpstreamErrorKind;
use crate::stream::UpstreamStream;

/// The most a check reads while looking for its response head, 1xx heads included. A health
/// endpoint has no reason to send big heads, and the probe should cost the proxy next to nothing
/// however the server misbehaves.
pub const MAX_CHECK_HEAD: usize = 16 * 1024;

/// The first round starts after a random delay of up to this share of the interval, so that
/// upstreams configured alike (or a fleet of proxies started together) do not probe in lockstep.
/// Small enough that every server is checked well within its first interval.
const FIRST_ROUND_JITTER: u32 = 10;

/// Why a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("connection refused")]
    ConnectRefused,
    #[error("connect timed out")]
    ConnectTimeout,
    /// Any other connect error (unreachable network, no route, ...).
    #[error("connect failed")]
    Connect,
    /// The upstream has TLS and the handshake failed (its certificate did not verify, say).
    #[error("TLS handshake failed")]
    Tls,
    /// Connected, but no complete response head within the check's timeout.
    #[error("timed out waiting for the response")]
    Timeout,
    /// The server closed or reset the connection before a complete response head.
    #[error("connection closed before a response")]
    Closed,
    #[error("bad response: {0}")]
    BadResponse(&'static str),
    /// A well-formed response whose status is not in `expect`.
    #[error("status {0}")]
    Status(u16),
}

impl ProbeFailure {
    /// A stable name for logs and counters; the `Display` form carries the details.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::ConnectRefused => "connect_refused",
            ProbeFailure::ConnectTimeout => "connect_timeout",
            ProbeFailure::Connect => "connect",
            ProbeFailure::Tls => "tls",
            ProbeFailure::Timeout => "timeout",
            ProbeFailure::Closed => "closed",
            ProbeFailure::BadResponse(_) => "bad_response",
            ProbeFailure::Status(_) => "status",
        }
    }
}

/// Checks every server of `upstream` at once and then each interval, until `stop`.
pub async fn run(upstream: Arc<Upstream>, stop: CancellationToken) {
    let Some(check) = upstream.health_check.clone() else {
        return;
    };
    let check = Arc::new(check);
    // `interval` panics on zero; the config never allows it, but this must not depend on that.
    let period = check.interval.max(Duration::from_millis(1));
    let jitter = period / FIRST_ROUND_JITTER;
    let jitter = Duration::from_nanos(fastrand::u64(
        0..=u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX),
    ));
    let mut ticks = tokio::time::interval_at(Instant::now() + jitter, period);
    // A round can take up to `timeout`, which may equal the interval: never make up for a late
    // round with a burst of probes.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Reloaded each round: DNS re-resolution may have changed the servers.
        let targets = upstream.targets.load_full();
        let mut probes = JoinSet::new();
        // Re-resolution can list one address twice (two names, one host); its state is shared,
        // and probing it twice a round would count each result twice against rise and fall.
        let mut seen = HashSet::with_capacity(targets.servers.len());
        for (i, server) in targets.servers.iter().enumerate() {
            if !seen.insert(Arc::clone(&server.key)) {
                continue;
            }
            let address = server.address;
            let check = Arc::clone(&check);
            // Probes go the way requests go: over TLS when the upstream has it.
            let tls = upstream.tls.clone();
            let host_name = server.host_name.clone();
            let http2 = upstream.protocol.is_http2();
            probes.spawn(async move {
                let dial = Dial {
                    tls: tls.as_deref(),
                    host_name: host_name.as_deref(),
                };
                (i, probe_with(address, &check, dial, http2).await)
            });
        }
        // Dropping the set on `stop` aborts the probes still running.
        loop {
            let joined = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                joined = probes.join_next() => joined,
            };
            match joined {
                None => break,
                Some(Ok((i, result))) => {
                    if let Some(server) = targets.servers.get(i) {
                        record(&upstream.name, server, &check, result);
                    }
                }
                Some(Err(e)) => {
                    // A panicking probe is a bug here, not a verdict on the server: record nothing.
                    tracing::error!(upstream = %upstream.name, error = %e, "health check task failed");
                }
            }
        }
    }
}

fn record(
    upstream: &str,
    server: &Server,
    check: &HealthCheckSettings,
    result: Result<(), ProbeFailure>,
) {
    let transition = server
        .state
        .record_check(result.is_ok(), check.rise, check.fall);
    match (transition, result) {
        (Some(CheckTransition::WentDown), Err(failure)) => tracing::warn!(
            upstream = %upstream,
            server = %server.address,
            reason = %failure,
            "server failed {} health checks in a row; taking it out of rotation",
            check.fall
        ),
        (Some(CheckTransition::CameUp), _) => tracing::info!(
            upstream = %upstream,
            server = %server.address,
            "server passed {} health checks in a row; back in rotation",
            check.rise
        ),
        (_, Err(failure)) => tracing::debug!(
            upstream = %upstream,
            server = %server.address,
            reason = %failure,
            "health check failed"
        ),
        (_, Ok(())) => {}
    }
}

/// One check of the server at `addr`, bounded as a whole by `check.timeout`, over HTTP/1.1.
pub async fn probe(
    addr: SocketAddr,
    check: &HealthCheckSettings,
    dial: Dial<'_>,
) -> Result<(), ProbeFailure> {
    probe_with(addr, check, dial, false).await
}

/// One check; with `http2`, an HTTP check is a GET on an HTTP/2 connection of its own (the
/// upstream's `protocol` is h2c or h2), as the requests to it are.
pub async fn probe_with(
    addr: SocketAddr,
    check: &HealthCheckSettings,
    dial: Dial<'_>,
    http2: bool,
) -> Result<(), ProbeFailure> {
    let deadline = Instant::now() + check.timeout;
    let stream = super::connect(addr, check.timeout, dial)
        .await
        .map_err(|kind| match kind {
            UpstreamErrorKind::ConnectRefused => ProbeFailure::ConnectRefused,
            UpstreamErrorKind::ConnectTimeout => ProbeFailure::ConnectTimeout,
            UpstreamErrorKind::Tls => ProbeFailure::Tls,
            _ => ProbeFailure::Connect,
        })?;
    match &check.kind {
        HealthCheckKind::Tcp => Ok(()),
        HealthCheckKind::Http { path, host, expect } => {
            let host = match host {
                Some(h) => h.clone(),
                None => addr.to_string(),
            };
            if http2 {
                return match tokio::time::timeout_at(
                    deadline,
                    exchange_h2(stream, &host, path, expect),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(ProbeFailure::Timeout),
                };
            }
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gatehouse-health-check\r\nConnection: close\r\n\r\n"
            );
            match tokio::time::timeout_at(deadline, exchange(stream, request, expect)).await {
                Ok(result) => result,
                Err(_) => Err(ProbeFailure::Timeout),
            }
        }
    }
}

/// Sends the check request and judges the first final response head; the body is never read, and
/// the connection is dropped as soon as the head is in (the request said `Connection: close`).
async fn exchange(
    mut stream: UpstreamStream,
    request: String,
    expect: &StatusSet,
) -> Result<(), ProbeFailure> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| ProbeFailure::Closed)?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut read_total = 0usize;
    loop {
        match response::parse(&mut buf, false) {
            // 100 Continue, 103 Early Hints and the like come before the real answer; 101 is
            // final (and never what a health endpoint should say), so the status check judges it.
            Ok(Some(head)) if head.is_informational() && head.status != 101 => continue,
            Ok(Some(head)) if expect.contains(head.status) => return Ok(()),
            Ok(Some(head)) => return Err(ProbeFailure::Status(head.status)),
            Ok(None) => {}
            Err(bad) => return Err(ProbeFailure::BadResponse(bad.0)),
        }
        if read_total >= MAX_CHECK_HEAD {
            return Err(ProbeFailure::BadResponse("response head too large"));
        }
        // Never read past the cap, whatever the server sends.
        let room = (MAX_CHECK_HEAD - read_total).min(4096);
        buf.reserve(room);
        let n = read_some(&mut stream, &mut buf, room).await?;
        read_total += n;
    }
}

/// The check over HTTP/2: handshake, one GET with END_STREAM, the status of its response
/// head judged; the connection is dropped at once (no GOAWAY is owed to a server we leave).
async fn exchange_h2(
    stream: UpstreamStream,
    host: &str,
    path: &str,
    expect: &StatusSet,
) -> Result<(), ProbeFailure> {
    let handshake = h2::client::Builder::new()
        .max_header_list_size(u32::try_from(MAX_CHECK_HEAD).unwrap_or(u32::MAX))
        .handshake::<_, bytes::Bytes>(stream);
    let (send, connection) = handshake
        .await
        .map_err(|_| ProbeFailure::BadResponse("HTTP/2 handshake failed"))?;
    let ask = async {
        let mut send = send.ready().await.map_err(|_| ProbeFailure::Closed)?;
        let request = http::Request::get(format!("http://{host}{path}"))
            .header("user-agent", "gatehouse-health-check")
            .body(())
            .map_err(|_| ProbeFailure::BadResponse("invalid health check request"))?;
        let (response, _) = send
            .send_request(request, true)
            .map_err(|_| ProbeFailure::Closed)?;
        let status = response
            .await
            .map_err(|_| ProbeFailure::Closed)?
            .status()
            .as_u16();
        if expect.contains(status) {
            Ok(())
        } else {
            Err(ProbeFailure::Status(status))
        }
    };
    tokio::select! {
        judged = ask => judged,
        // The connection must be driven for the request to move; it ending first is a close.
        _ = connection => Err(ProbeFailure::Closed),
    }
}

async fn read_some(
    stream: &mut UpstreamStream,
    buf: &mut BytesMut,
    room: usize,
) -> Result<usize, ProbeFailure> {
    let mut limited = (&mut *stream).take(u64::try_from(room).unwrap_or(u64::MAX));
    match limited.read_buf(buf).await {
        Ok(0) => Err(ProbeFailure::Closed),
        Ok(n) => Ok(n),
        // Reset, broken pipe: to a check, all the same as a close.
        Err(_) => Err(ProbeFailure::Closed),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::config::load_str;
    use crate::metrics::Metrics;

    fn http(path: &str, host: Option<&str>, expect: &[(u16, u16)]) -> HealthCheckSettings {
        HealthCheckSettings {
            kind: HealthCheckKind::Http {
                path: path.to_owned(),
                host: host.map(str::to_owned),
                expect: StatusSet(expect.to_vec()),
            },
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 2,
        }
    }

    fn tcp() -> HealthCheckSettings {
        HealthCheckSettings {
            kind: HealthCheckKind::Tcp,
            ..http("/", None, &[(200, 399)])
        }
    }

    /// Reads one request head (up to the blank line) from `stream`.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => head.push(byte[0]),
            }
        }
        head
    }

    /// A listener that answers one connection with `answer` after reading its request head,
    /// and hands the head it read to the returned receiver.
    async fn answering(answer: &'static [u8]) -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let head = read_head(&mut stream).await;
            let _ = stream.write_all(answer).await;
            let _ = tx.send(head);
            // Keep the connection open until the client hangs up, as a real server would.
            let mut rest = [0u8; 64];
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        });
        (addr, rx)
    }

    fn closed_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[tokio::test]
    async fn status_200_passes() {
        let (addr, _) = answering(OK).await;
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn status_outside_expect_fails_with_the_status() {
        const UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        let (addr, _) = answering(UNAVAILABLE).await;
        let failure = probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await;
        assert_eq!(failure, Err(ProbeFailure::Status(503)));
        assert_eq!(failure.unwrap_err().to_string(), "status 503");

        let (addr, _) = answering(UNAVAILABLE).await;
        let lenient = http("/", None, &[(200, 299), (503, 503)]);
        assert_eq!(probe(addr, &lenient, Dial::PLAIN).await, Ok(()));
    }

    #[tokio::test]
    async fn informational_heads_are_skipped() {
        let (addr, _) = answering(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        )
        .await;
        assert_eq!(
            probe(addr, &http("/", None, &[(204, 204)]), Dial::PLAIN).await,
            Ok(())
        );

        let (addr, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").await;
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await,
            Err(ProbeFailure::Status(101))
        );
    }

    #[tokio::test]
    async fn silence_times_out_within_the_check_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            // Accept, then hold the connection open without a word.
            let (stream, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(stream);
        });
        let check = http("/", None, &[(200, 399)]);
        let started = Instant::now();
        let result =
            tokio::time::timeout(Duration::from_secs(10), probe(addr, &check, Dial::PLAIN))
                .await
                .expect("the probe bounds itself");
        assert_eq!(result, Err(ProbeFailure::Timeout));
        assert!(started.elapsed() >= check.timeout);
        held.abort();
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let addr = closed_port();
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await,
            Err(ProbeFailure::ConnectRefused)
        );
        assert_eq!(
            probe(addr, &tcp(), Dial::PLAIN).await,
            Err(ProbeFailure::ConnectRefused)
        );
    }

    #[tokio::test]
    async fn tcp_check_passes_on_connect_and_sends_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut all = Vec::new();
            let _ = stream.read_to_end(&mut all).await;
            all
        });
        assert_eq!(probe(addr, &tcp(), Dial::PLAIN).await, Ok(()));
        assert_eq!(got.await.unwrap(), b"", "a TCP check writes nothing");
    }

    #[tokio::test]
    async fn garbage_is_a_bad_response() {
        let (addr, _) = answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        let result = probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await;
        assert!(
            matches!(result, Err(ProbeFailure::BadResponse(_))),
            "{result:?}"
        );
        assert_eq!(result.unwrap_err().as_str(), "bad_response");
    }

    #[tokio::test]
    async fn oversized_head_is_a_bad_response() {
        static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let huge = HUGE.get_or_init(|| {
            let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
            // Few long fields: many short ones would trip the parser's field-count limit first.
            while h.len() <= MAX_CHECK_HEAD {
                h.extend_from_slice(b"X-Filler: ");
                h.extend_from_slice(&[b'a'; 1000]);
                h.extend_from_slice(b"\r\n");
            }
            h.extend_from_slice(b"\r\n");
            h
        });
        let (addr, _) = answering(huge).await;
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await,
            Err(ProbeFailure::BadResponse("response head too large"))
        );
    }

    #[tokio::test]
    async fn close_before_answer_is_closed() {
        // Half a status line, then the server hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = read_head(&mut stream).await;
            let _ = stream.write_all(b"HTTP/1.1 200").await;
            let _ = stream.shutdown().await;
            let mut rest = [0u8; 64];
            while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
        });
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 399)]), Dial::PLAIN).await,
            Err(ProbeFailure::Closed)
        );
    }

    #[tokio::test]
    async fn request_carries_the_configured_path_and_host() {
        let (addr, head) = answering(OK).await;
        let check = http("/healthz?deep=1", Some("app.internal"), &[(200, 299)]);
        assert_eq!(probe(addr, &check, Dial::PLAIN).await, Ok(()));
        assert_eq!(
            String::from_utf8(head.await.unwrap()).unwrap(),
            "GET /healthz?deep=1 HTTP/1.1\r\nHost: app.internal\r\nUser-Agent: gatehouse-health-check\r\nConnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn host_defaults_to_the_server_address() {
        let (addr, head) = answering(OK).await;
        assert_eq!(
            probe(addr, &http("/", None, &[(200, 299)]), Dial::PLAIN).await,
            Ok(())
        );
        let head = String::from_utf8(head.await.unwrap()).unwrap();
        assert!(
            head.starts_with(&format!("GET / HTTP/1.1\r\nHost: {addr}\r\n")),
            "{head:?}"
        );
    }

    /// A server that answers every check with 503 and counts them.
    async fn failing_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let _ = read_head(&mut stream).await;
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = stream
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn run_takes_a_failing_server_down_and_stops_when_told() {
        let (addr, checks) = failing_server().await;
        let text = format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             [upstream.app]\nservers = [\"{addr}\"]\n\
             [upstream.app.health_check]\ninterval = \"50ms\"\ntimeout = \"50ms\"\nfall = 2\n\
             [[route]]\npath = \"/\"\nupstream = \"app\"\n"
        );
        let snapshot = load_str(Path::new("t.toml"), &text, &Metrics::default()).unwrap();
        let upstream = Arc::clone(&snapshot.upstreams[0]);
        let state = Arc::clone(&upstream.targets.load().servers[0].state);
        assert!(state.is_up(), "servers start healthy");
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(Arc::clone(&upstream), stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), async {
            while state.is_up() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("two failed checks take the server down");
        assert!(checks.load(Ordering::SeqCst) >= 2);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("run ends once stopped")
            .unwrap();
    }

    #[test]
    fn failure_names_are_stable() {
        assert_eq!(ProbeFailure::ConnectRefused.as_str(), "connect_refused");
        assert_eq!(ProbeFailure::Status(500).as_str(), "status");
        assert_eq!(
            ProbeFailure::Timeout.to_string(),
            "timed out waiting for the response"
        );
    }
}
