//! Graceful shutdown: in-flight requests finish, nothing new is accepted, the process exits 0.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::support::child::Running;
use crate::support::proxy::write_config;
use crate::support::raw::RawConn;
use crate::support::{
    client, poll_until, route_toml, upstream_toml, within, within_for, HttpUpstream, Proxy,
};

const SLOW_BODY: &str = "slow response, complete\n";

/// Drops ANSI escape sequences (`ESC [ ... letter`), in case the log is coloured.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address after "listening on" in a log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on")? + "listening on".len()..];
    let start = rest.find("127.0.0.1:")?;
    let addr: String = rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_and_exits_zero() {
    let up = HttpUpstream::delayed(Duration::from_millis(1500), SLOW_BODY).await;
    let config = write_config(&format!(
        "[log]\naccess = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [timeouts]\nshutdown_grace = \"20s\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\n{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["run", "-c"])
        .arg(config.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning gatehouse run");
    let stderr = child.stderr.take().expect("piped stderr");
    let child = Running(child);

    // Read stderr on a thread for as long as the process lives, so it never blocks on a full
    // pipe; forward the lines.
    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let (mut web, mut admin) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while web.is_none() || admin.is_none() {
            let Some(line) = lines.recv().await else {
                return false;
            };
            if line.contains("admin API listening on") {
                admin = listening_addr(&line);
            } else if line.contains("listening on") {
                web = listening_addr(&line);
            }
            log.push(line);
        }
        true
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "did not see both \"listening on\" lines; stderr so far:\n{}",
        log.join("\n")
    );
    let web = web.expect("listener address");
    let admin = admin.expect("admin address");
    assert_ne!(web, admin);

    let url = format!("http://{web}/slow");
    let in_flight = tokio::spawn(async move {
        let resp = client().get(url).send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    });
    up.wait_for_requests(1).await;

    child.signal("TERM");

    let result = within("the in-flight request during shutdown", in_flight)
        .await
        .expect("request task");
    match result {
        Ok((status, body)) => {
            assert_eq!(status, 200);
            assert_eq!(body, SLOW_BODY);
        }
        Err(e) => panic!("the in-flight request failed during graceful shutdown: {e}"),
    }

    let refused = poll_until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(web)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "new connections are still accepted after SIGTERM"
    );

    let mut child = child;
    let status = within_for(Duration::from_secs(20), "gatehouse to exit", async {
        loop {
            if let Some(status) = child.0.try_wait().expect("waiting for gatehouse") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Collect what is left of stderr for the failure message.
    while let Ok(line) = lines.try_recv() {
        log.push(line);
    }
    assert!(
        status.success(),
        "gatehouse exited with {status}; stderr:\n{}",
        log.join("\n")
    );
    assert_eq!(up.requests(), 1);
}

async fn slow_proxy() -> (HttpUpstream, Proxy) {
    let up = HttpUpstream::delayed(Duration::from_millis(1000), SLOW_BODY).await;
    let proxy = Proxy::start(&format!(
        "[timeouts]\nshutdown_grace = \"60s\"\n\n{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_request_in_flight_during_shutdown_gets_connection_close() {
    let (up, proxy) = slow_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    up.wait_for_requests(1).await;
    proxy.shutdown();
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), SLOW_BODY);
    assert!(
        resp.connection_has("close"),
        "a response finished during shutdown must carry Connection: close:\n{}",
        resp.head
    );
    assert!(
        conn.closed_within(Duration::from_secs(10)).await,
        "the connection stays open after the Connection: close response"
    );
    proxy.wait(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_an_idle_connection_just_after_a_drain_began_is_answered_not_reset() {
    // The client cannot know the drain began; its next request on a keep-alive connection is
    // served and told to reconnect, not met by a close (which it would see as a failure).
    let up = HttpUpstream::fixed("fast\n").await;
    let proxy = Proxy::start(&format!(
        "[timeouts]\nshutdown_grace = \"60s\"\n\n{}{}",
        upstream_toml("app", &[up.addr()]),
        route_toml("/", "app")
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let first = conn.read_response(false).await;
    assert_eq!(first.status, 200);
    assert!(!first.connection_has("close"), "{}", first.head);

    proxy.shutdown();
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let second = conn.read_response(false).await;
    assert_eq!(second.status, 200, "{}", second.head);
    assert!(second.connection_has("close"), "{}", second.head);
    assert!(
        conn.closed_within(Duration::from_secs(10)).await,
        "the connection stays open after Connection: close"
    );
    proxy.wait(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    // shutdown_grace is 60 s; an idle connection is closed a moment after the drain began
    // (app::IDLE_CLOSE_AFTER), not waited on for the whole grace period (the 20 s limit only
    // stops a hang).
    let (_up, proxy) = slow_proxy().await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    assert_eq!(conn.read_response(false).await.status, 200);
    proxy.shutdown();
    assert!(
        conn.closed_within(Duration::from_secs(20)).await,
        "an idle keep-alive connection stays open after shutdown"
    );
    proxy.wait(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_are_refused_after_shutdown() {
    let (_up, proxy) = slow_proxy().await;
    let addr = proxy.addr();
    let resp = client().get(proxy.url("/")).send().await.expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    proxy.shutdown();
    let refused = poll_until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "connections still accepted after shutdown()"
    );
    proxy.wait(Duration::from_secs(20)).await;
}
