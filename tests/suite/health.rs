//! Active health checks, seen from outside: which servers the proxied requests reach while the
//! servers' health endpoints change, counted at the servers.
//!
//! Passive ejection is off in every test (`consecutive_failures = 0`), so that only the active
//! checks move servers in and out. A server is "in rotation" when a short batch of sequential
//! requests reaches it: with two servers and round-robin, a server that is up gets every other
//! request, so a batch that misses it entirely means it is out.

use std::net::SocketAddr;

use crate::support::flaky::FlakyUpstream;
use crate::support::proxy::metric_value;
use crate::support::{client, poll_until, route_toml, upstream_toml, Proxy, STEP_TIMEOUT};

/// Requests per probe of the rotation; 3 of them reach a server that is up.
const BATCH: usize = 6;

/// The proxy in front of `servers` as upstream `app`, with `check` as its
/// `[upstream.app.health_check]` body and `extra` appended to the upstream (sub-tables).
async fn proxy_with(servers: &[&FlakyUpstream], check: &str, extra: &str) -> Proxy {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    Proxy::start(&format!(
        "{}[upstream.app.health_check]\n{check}\n\n[upstream.app.outlier]\nconsecutive_failures = 0\n\n{extra}\n{}",
        upstream_toml("app", &addrs),
        route_toml("/", "app"),
    ))
    .await
}

/// Sends `n` sequential GETs and returns each one's status and body.
async fn send(proxy: &Proxy, n: usize) -> Vec<(u16, String)> {
    let client = client();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let resp = client
            .get(proxy.url(&format!("/page/{i}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /page/{i}: {e}"));
        let status = resp.status().as_u16();
        out.push((status, resp.text().await.unwrap_or_default()));
    }
    out
}

/// How many of a batch of proxied requests `server` served.
async fn batch_share(proxy: &Proxy, server: &FlakyUpstream) -> usize {
    let before = server.served();
    let answers = send(proxy, BATCH).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "a proxied GET failed: {body}");
    }
    server.served() - before
}

/// Waits until a batch of requests misses `server` entirely.
async fn wait_out_of_rotation(proxy: &Proxy, server: &FlakyUpstream) {
    let out = poll_until(STEP_TIMEOUT, || async {
        (batch_share(proxy, server).await == 0).then_some(())
    })
    .await;
    assert!(
        out.is_some(),
        "server {} still gets requests; its checks answered {:?}",
        server.name(),
        server.check_answers()
    );
}

/// Waits until a batch of requests reaches `server` again.
async fn wait_in_rotation(proxy: &Proxy, server: &FlakyUpstream) {
    let back = poll_until(STEP_TIMEOUT, || async {
        (batch_share(proxy, server).await > 0).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "server {} gets no requests; its checks answered {:?}",
        server.name(),
        server.check_answers()
    );
}

/// Waits until `server` has answered at least `n` checks.
async fn wait_for_checks(server: &FlakyUpstream, n: usize) {
    let seen = poll_until(STEP_TIMEOUT, || async {
        (server.check_answers().len() >= n).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "server {} answered only {:?}",
        server.name(),
        server.check_answers()
    );
}

/// The sum of `gatehouse_upstream_errors_total` over every kind, for upstream `app`.
async fn upstream_errors(proxy: &Proxy) -> f64 {
    let metrics = proxy.metrics().await;
    [
        "connect_refused",
        "connect_timeout",
        "connect",
        "reset",
        "timeout",
        "bad_response",
        "closed_early",
    ]
    .iter()
    .filter_map(|kind| {
        metric_value(
            &metrics,
            &format!("gatehouse_upstream_errors_total{{upstream=\"app\",kind=\"{kind}\"}}"),
        )
    })
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_takes_a_server_out_until_it_rises_again() {
    let a = FlakyUpstream::start("a").await;
    let b = FlakyUpstream::start("b").await;
    let proxy = proxy_with(
        &[&a, &b],
        "path = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2",
        "",
    )
    .await;
    // Checks start on their own, and both servers take traffic while they pass.
    wait_for_checks(&a, 1).await;
    wait_for_checks(&b, 1).await;
    wait_in_rotation(&proxy, &b).await;

    b.set_health(503);
    wait_out_of_rotation(&proxy, &b).await;
    assert!(
        b.checks_answered(503) >= 2,
        "out after fewer than fall = 2 failed checks: {:?}",
        b.check_answers()
    );
    let (a_before, b_before) = (a.served(), b.served());
    let answers = send(&proxy, 30).await;
    assert!(
        answers.iter().all(|(s, body)| *s == 200 && body == "a"),
        "{answers:?}"
    );
    assert_eq!(a.served() - a_before, 30);
    assert_eq!(b.served() - b_before, 0, "the down server got requests");

    let passed_before = b.checks_answered(200);
    b.set_health(200);
    wait_in_rotation(&proxy, &b).await;
    assert!(
        b.checks_answered(200) - passed_before >= 2,
        "back after fewer than rise = 2 passed checks: {:?}",
        b.check_answers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_takes_a_killed_server_out_and_clients_see_no_errors() {
    let a = FlakyUpstream::start("a").await;
    let mut b = FlakyUpstream::start("b").await;
    // One try per request, so that any failure other than a refused connect (which the proxy
    // always moves past to another server) reaches the client.
    let proxy = proxy_with(
        &[&a, &b],
        "type = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2",
        "[upstream.app.retry]\nattempts = 1\n",
    )
    .await;
    wait_in_rotation(&proxy, &b).await;
    assert!(b.check_answers().is_empty(), "a TCP check sends no request");

    b.kill().await;
    // The refused connects hide from the client, not from the metrics: the server is out once a
    // batch of requests adds no upstream error.
    let out = poll_until(STEP_TIMEOUT, || async {
        let before = upstream_errors(&proxy).await;
        let answers = send(&proxy, BATCH).await;
        let clean = answers.iter().all(|(s, body)| *s == 200 && body == "a");
        (clean && upstream_errors(&proxy).await == before).then_some(())
    })
    .await;
    assert!(out.is_some(), "the proxy still tries the dead server");

    let errors_before = upstream_errors(&proxy).await;
    let answers = send(&proxy, 40).await;
    assert!(
        answers.iter().all(|(s, body)| *s == 200 && body == "a"),
        "{answers:?}"
    );
    assert_eq!(
        upstream_errors(&proxy).await,
        errors_before,
        "the proxy tried the dead server after its checks took it out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_leaves_only_after_fall_failed_checks() {
    let a = FlakyUpstream::start("a").await;
    let b = FlakyUpstream::start("b").await;
    let proxy = proxy_with(
        &[&a, &b],
        "path = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3",
        "",
    )
    .await;
    wait_in_rotation(&proxy, &b).await;

    b.set_health(503);
    wait_out_of_rotation(&proxy, &b).await;
    let failed = b.checks_answered(503);
    assert!(
        failed >= 3,
        "out after {failed} failed checks, fall = 3: {:?}",
        b.check_answers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_breaks_the_failure_streak() {
    let a = FlakyUpstream::start("a").await;
    let b = FlakyUpstream::start("b").await;
    // Longer than the other tests' checks: a check timing out on a busy machine would be a third
    // failure in a row here.
    let proxy = proxy_with(
        &[&a, &b],
        "path = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 3",
        "",
    )
    .await;
    wait_in_rotation(&proxy, &b).await;

    // Fail, fail, pass, fail, fail, then passes again: never three failures in a row.
    b.script_health(&[503, 503, 200, 503, 503]);
    let done = poll_until(STEP_TIMEOUT, || async {
        let answers = b.check_answers();
        let last_failure = answers.iter().rposition(|&s| s == 503)?;
        (answers.iter().filter(|&&s| s == 503).count() == 4 && answers.len() > last_failure + 1)
            .then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "the script did not run: {:?}",
        b.check_answers()
    );
    let answers = b.check_answers();
    assert!(
        !answers.windows(3).any(|w| w.iter().all(|&s| s != 200)),
        "three failures in a row: {answers:?}"
    );
    assert!(
        batch_share(&proxy, &b).await > 0,
        "two failures at a time took the server out: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_outside_expect_takes_the_server_down() {
    let a = FlakyUpstream::start("a").await;
    let b = FlakyUpstream::start("b").await;
    a.set_health(204);
    let proxy = proxy_with(
        &[&a, &b],
        "path = \"/healthz\"\nexpect = [204]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2",
        "",
    )
    .await;
    wait_out_of_rotation(&proxy, &b).await;
    assert!(b.checks_answered(200) >= 2, "{:?}", b.check_answers());
    let before = b.served();
    let answers = send(&proxy, 20).await;
    assert!(
        answers.iter().all(|(s, body)| *s == 200 && body == "a"),
        "{answers:?}"
    );
    assert_eq!(
        b.served(),
        before,
        "a server answering 200 to expect = [204] got requests"
    );
}
