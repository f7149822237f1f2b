//! Fixtures shared by every integration test: Gatehouse itself, upstream servers, clients.
//!
//! - `proxy`: writes a config to a temp file and starts Gatehouse in-process on port 0.
//! - `http_upstream`: a hyper server with a pluggable handler (echo, sized body, delay) that
//!   counts the TCP connections it accepts and the requests it serves.
//! - `raw`: raw TCP upstreams that misbehave on purpose, and a raw client for requests that a
//!   real HTTP client would refuse to send.
//! - `body`: deterministic large bodies and a checksum to compare them on both ends.
//! - `load`: bounded keep-alive load that sorts failures (refused, reset, other), for the
//!   reload and upgrade tests.
//!
//! Nothing here sleeps for a fixed time to let something happen: waits are polls bounded by a
//! timeout, so a slow machine makes the suite slower, never flaky.

// Each test module uses a different part of the fixtures.
#![allow(dead_code)]

pub mod backend;
pub mod body;
pub mod certs;
pub mod child;
pub mod dns;
pub mod flaky;
pub mod h2;
pub mod http_upstream;
pub mod load;
pub mod proxy;
pub mod raw;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

pub use body::Checksum;
pub use http_upstream::{Echo, HttpUpstream};
pub use proxy::Proxy;

/// The longest any single step of a test may take before it is reported as a hang.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` when it takes longer than `STEP_TIMEOUT`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP_TIMEOUT, what, fut).await
}

/// Like `within`, with an explicit limit.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`; `None` on timeout.
pub async fn poll_until<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP client for ordinary requests: no proxy from the environment (a CI machine's
/// `HTTP_PROXY` must not intercept 127.0.0.1), and a timeout so that a hang fails the test.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(60))
}

pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("building a reqwest client")
}

/// An address on which nothing listens, and nothing in this test process ever will: a port
/// from `reserved_listener`, closed again.
pub fn closed_port() -> SocketAddr {
    let listener = reserved_listener();
    let addr = listener.local_addr().expect("probe port address");
    drop(listener);
    addr
}

/// A listener on 127.0.0.1 for a server that a test kills, restarts, or leaves closed.
///
/// On a port the kernel hands out (`:0`), a closed server's port can be handed to another test
/// running at the same time, which would then receive this test's traffic (retries, health
/// checks) and miscount. So these take ports below the kernel's ephemeral range (32768 and up
/// on Linux), each port at most once per test process.
pub fn reserved_listener() -> std::net::TcpListener {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 20_000 + (std::process::id() as usize % 500) * 20;
    for _ in 0..1000 {
        let port = base + NEXT.fetch_add(1, Ordering::SeqCst) % 12_000;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    panic!("no free port in the reserved range");
}

/// `reserved_listener` for tokio.
pub fn reserved_tokio_listener() -> tokio::net::TcpListener {
    let listener = reserved_listener();
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    tokio::net::TcpListener::from_std(listener).expect("registering a listener")
}

/// Runs `gatehouse check -c FILE` on `toml`; returns (exit code, stdout + stderr, the file's
/// path, which starts every diagnostic line).
pub fn gatehouse_check(toml: &str) -> (Option<i32>, String, String) {
    let file = proxy::write_config(toml);
    let path = file.path().display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "-c", &path])
        .env("NO_COLOR", "1")
        .output()
        .expect("running gatehouse check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, path)
}

/// The TOML for `[upstream.NAME]` with equal-weight servers and nothing else.
pub fn upstream_toml(name: &str, servers: &[SocketAddr]) -> String {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[upstream.{name}]\nservers = [{}]\n\n", list.join(", "))
}

/// The TOML for one `[[route]]` sending `path` (any host) to `upstream`.
pub fn route_toml(path: &str, upstream: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nupstream = \"{upstream}\"\n\n")
}
