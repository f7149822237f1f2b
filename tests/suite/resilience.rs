//! Traffic keeps flowing when upstream servers die, hang, slow down or fill up: each test makes
//! one server misbehave under real traffic through Gatehouse and counts, at the client and at
//! the servers, what happened. Figures are printed (run with `--nocapture`) for
//! `docs/resilience.md`; the assertions are on counts, never on timings.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::backend::{Backend, Mode};
use crate::support::{client, poll_until, route_toml, Proxy};

/// `[upstream.app]` over `backends` with `extra` keys (and tables after them).
fn upstream(backends: &[&Backend], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr()))
        .collect();
    format!(
        "[upstream.app]\nservers = [{}]\n{extra}\n{}",
        list.join(", "),
        route_toml("/", "app")
    )
}

/// What a bounded load run saw at the client.
struct Load {
    ok: usize,
    /// The status of every failed request; 0 when no response came at all.
    failures: Vec<u16>,
    /// Every request's time, in the order they finished.
    latencies: Vec<Duration>,
}

impl Load {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
        sorted.get(i).copied().unwrap_or_default()
    }

    /// Requests that took longer than `limit`.
    fn slower_than(&self, limit: Duration) -> usize {
        self.latencies.iter().filter(|&&d| d > limit).count()
    }
}

/// Sends `total` GETs from `concurrency` tasks; calls `midway` once after `at` of them are done.
/// Returns (successes, failures with their statuses).
async fn load(
    proxy: &Proxy,
    total: usize,
    concurrency: usize,
    at: usize,
    midway: impl FnOnce(),
) -> (usize, Vec<u16>) {
    let run = load_url(&proxy.url("/load"), total, concurrency, at, midway).await;
    (run.ok, run.failures)
}

async fn load_url(
    url: &str,
    total: usize,
    concurrency: usize,
    at: usize,
    midway: impl FnOnce(),
) -> Load {
    let done = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (done, seen, next, url) = (
            Arc::clone(&done),
            Arc::clone(&seen),
            Arc::clone(&next),
            url.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let client = client();
            while next.fetch_add(1, SeqCst) < total {
                let started = Instant::now();
                let status = match client.get(&url).send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                let took = started.elapsed();
                {
                    let mut seen = seen.lock().expect("load results");
                    seen.1.push(took);
                    if status != 200 {
                        seen.0.push(status);
                    }
                }
                done.fetch_add(1, SeqCst);
            }
        }));
    }
    let reached = poll_until(Duration::from_secs(120), || async {
        (done.load(SeqCst) >= at).then_some(())
    })
    .await;
    assert!(reached.is_some(), "load stalled before {at} requests");
    midway();
    for t in tasks {
        t.await.expect("load task");
    }
    let (failures, latencies) = std::mem::take(&mut *seen.lock().expect("load results"));
    Load {
        ok: done.load(SeqCst) - failures.len(),
        failures,
        latencies,
    }
}

async fn get(url: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let r = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap_or_default(), headers)
}

async fn upstreams_json(proxy: &Proxy) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/upstreams").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/upstreams is JSON")
}

fn server_state(json: &serde_json::Value, addr: std::net::SocketAddr) -> String {
    json["upstreams"][0]["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["address"] == addr.to_string()))
        .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_under_load_loses_no_get() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    // A long ejection, so that the killed server is still out when the load ends.
    let proxy = Proxy::start(&upstream(
        &[&a, &b, &c],
        "[upstream.app.outlier]\nbase_ejection = \"5m\"\n",
    ))
    .await;
    let started = Instant::now();
    let (ok, failed) = load(&proxy, 2000, 8, 700, || b.kill()).await;
    let b_after = b.requests();
    println!(
        "figure kill-1-of-3: {} requests, {} failed, {ok} ok in {:?}; a={} b={} c={}",
        ok + failed.len(),
        failed.len(),
        started.elapsed(),
        a.requests(),
        b_after,
        c.requests()
    );
    assert!(failed.is_empty(), "client-visible failures: {failed:?}");
    assert_eq!(ok, 2000);
    // The killed server is ejected: the request after the kill cannot reach it anyway, and the
    // admin API says so.
    let json = upstreams_json(&proxy).await;
    assert_eq!(server_state(&json, b.addr()), "ejected", "{json:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_is_ejected_after_the_configured_failures() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    b.set_mode(Mode::Hang);
    let proxy = Proxy::start(&upstream(
        &[&a, &b, &c],
        "[upstream.app.retry]\nper_try_timeout = \"200ms\"\n\
         [upstream.app.outlier]\nconsecutive_failures = 3\nbase_ejection = \"60s\"\n",
    ))
    .await;
    let started = Instant::now();
    let mut ejected_at = None;
    for i in 0..60 {
        let (status, body, _) = get(&proxy.url(&format!("/h/{i}"))).await;
        assert_eq!(status, 200, "request {i}: {body}");
        if ejected_at.is_none() && b.requests() == 3 {
            ejected_at = Some(started.elapsed());
        }
    }
    println!(
        "figure hung-server: ejected after {} requests reached it, {:?} after the first request; a={} c={}",
        b.requests(),
        ejected_at,
        a.requests(),
        c.requests()
    );
    // Sequential requests: every one that reached the hung server timed out there, and the
    // third in a row ejected it. None more reached it.
    assert_eq!(b.requests(), 3);
    assert_eq!(a.requests() + c.requests(), 60);
    let json = upstreams_json(&proxy).await;
    assert_eq!(server_state(&json, b.addr()), "ejected", "{json:#}");
    let metrics = proxy.metrics().await;
    let ejections = format!(
        "gatehouse_upstream_server_ejections_total{{upstream=\"app\",server=\"{}\"}} 1",
        b.addr()
    );
    assert!(metrics.contains(&ejections), "{metrics}");
    assert!(
        metrics.contains("gatehouse_upstream_retries_total{upstream=\"app\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_server_comes_back_after_its_ejection() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(&upstream(
        &[&a, &b],
        "[upstream.app.outlier]\nconsecutive_failures = 2\nbase_ejection = \"500ms\"\n",
    ))
    .await;
    b.kill();
    for i in 0..20 {
        let (status, body, _) = get(&proxy.url(&format!("/e/{i}"))).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    assert_eq!(
        server_state(&upstreams_json(&proxy).await, b.addr()),
        "ejected"
    );
    b.restart().await;
    let restarted = Instant::now();
    let back = poll_until(Duration::from_secs(20), || async {
        let _ = get(&proxy.url("/e/again")).await;
        (b.requests() > 0).then_some(())
    })
    .await;
    println!(
        "figure readmit: restarted server got traffic again {:?} after restart (base_ejection 500ms)",
        restarted.elapsed()
    );
    assert!(
        back.is_some(),
        "the restarted server never got traffic again"
    );
    assert_eq!(
        server_state(&upstreams_json(&proxy).await, b.addr()),
        "healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readmitted_server_ramps_up_over_slow_start() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(&upstream(
        &[&a, &b],
        "slow_start = \"60s\"\n[upstream.app.outlier]\nconsecutive_failures = 1\nbase_ejection = \"300ms\"\n",
    ))
    .await;
    b.kill();
    // The first request that picks it ejects it (one refused connect) and moves on to `a`.
    for i in 0..4 {
        let (status, body, _) = get(&proxy.url(&format!("/k/{i}"))).await;
        assert_eq!((status, body.as_str()), (200, "a"));
    }
    assert_eq!(
        server_state(&upstreams_json(&proxy).await, b.addr()),
        "ejected"
    );
    b.restart().await;
    let back = poll_until(Duration::from_secs(20), || async {
        let json = upstreams_json(&proxy).await;
        (server_state(&json, b.addr()) == "healthy").then_some(())
    })
    .await;
    assert!(back.is_some(), "the ejection never ended");
    let before = (a.requests(), b.requests());
    for i in 0..400 {
        let (status, _, _) = get(&proxy.url(&format!("/s/{i}"))).await;
        assert_eq!(status, 200);
    }
    let (ra, rb) = (a.requests() - before.0, b.requests() - before.1);
    println!("figure slow-start: in the first seconds of a 60 s ramp the readmitted server got {rb} of 400 requests (equal weights: 200)");
    // Early in a 60 s ramp its weight is a few percent of the other's: far from half.
    assert!(rb > 0, "a ramping server still gets some traffic");
    assert!(rb * 4 < ra, "a={ra} b={rb}");
    let json = upstreams_json(&proxy).await;
    let factor = json["upstreams"][0]["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["address"] == b.addr().to_string()))
        .and_then(|s| s["weight_factor"].as_f64())
        .unwrap_or(1.0);
    assert!(factor < 0.5, "weight_factor {factor}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_server_gets_less_traffic_under_peak_ewma() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    b.set_mode(Mode::Slow(Duration::from_millis(40)));
    let proxy = Proxy::start(&upstream(&[&a, &b, &c], "balance = \"peak_ewma\"\n")).await;
    let (ok, failed) = load(&proxy, 600, 6, 0, || {}).await;
    assert!(failed.is_empty(), "{failed:?}");
    let (ra, rb, rc) = (a.requests(), b.requests(), c.requests());
    println!("figure peak-ewma: {ok} requests, fast a={ra} c={rc}, slow b={rb}");
    // Round-robin would give it a third (200); the latency-aware balancer learns it is slow.
    assert!(rb * 10 < ok, "slow server got {rb} of {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_avoids_the_busy_server() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set_mode(Mode::Hang);
    let proxy = Proxy::start(&upstream(
        &[&a, &b],
        "balance = \"least_requests\"\n[upstream.app.outlier]\nconsecutive_failures = 0\n",
    ))
    .await;
    // Requests in the background until one is stuck at the hanging server (once one is, the
    // balancer sends none of the others there, which is the point).
    let mut stuck = Vec::new();
    while b.requests() < 1 {
        let url = proxy.url("/stuck");
        stuck.push(tokio::spawn(async move {
            let _ = client().get(&url).send().await;
        }));
        let seen = stuck.len();
        poll_until(Duration::from_secs(20), || async {
            (a.requests() + b.requests() >= seen).then_some(())
        })
        .await;
        assert!(stuck.len() < 100, "the hanging server never got a request");
    }
    // One in flight there, none at the other: every new request goes to the idle one.
    for i in 0..50 {
        let (status, body, _) = get(&proxy.url(&format!("/l/{i}"))).await;
        assert_eq!((status, body.as_str()), (200, "a"), "request {i}");
    }
    assert_eq!(b.requests(), 1);
    println!(
        "figure least-requests: with a request stuck at one server, 50 of 50 new requests went to the other"
    );
    for t in stuck {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_moves_only_the_removed_servers_keys() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::start(&upstream(
        &refs,
        "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"\n",
    ))
    .await;
    let client = client();
    let owner = |user: usize| {
        let client = client.clone();
        let url = proxy.url("/k");
        async move {
            let r = client
                .get(&url)
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .expect("hashed GET");
            assert_eq!(r.status(), 200);
            r.text().await.expect("body")
        }
    };
    let users = 400;
    let mut before = Vec::with_capacity(users);
    for u in 0..users {
        before.push(owner(u).await);
    }
    for (u, first) in before.iter().enumerate() {
        assert_eq!(
            &owner(u).await,
            first,
            "user {u} moved with nothing changed"
        );
    }
    backends[3].kill();
    let mut moved = 0;
    for (u, first) in before.iter().enumerate() {
        let now = owner(u).await;
        if first == "d" {
            assert_ne!(now, "d");
            moved += 1;
        } else {
            assert_eq!(&now, first, "user {u} moved though its server is up");
        }
    }
    println!(
        "figure consistent-hash: removing 1 of 4 servers moved {moved} of {users} keys ({:.1}%)",
        moved as f64 * 100.0 / users as f64
    );
    // About a quarter: d's own keys and no others.
    assert!(moved > users / 8 && moved < users * 3 / 8, "moved {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_sent_twice_unless_the_route_allows_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.set_mode(Mode::Close);
    b.set_mode(Mode::Close);
    let toml = format!(
        "[upstream.app]\nservers = [\"{}\", \"{}\"]\n[upstream.app.outlier]\nconsecutive_failures = 0\n\n\
         [[route]]\npath = \"/safe/\"\nupstream = \"app\"\nretry_with_body = true\n\n{}",
        a.addr(),
        b.addr(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&toml).await;
    let client = client();
    for i in 0..10 {
        let r = client
            .post(proxy.url(&format!("/pay/{i}")))
            .body("amount=10")
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 502);
    }
    assert_eq!(
        a.posts() + b.posts(),
        10,
        "every POST reached a server exactly once"
    );
    // GET on the same failing servers is retried on the other one.
    let (status, _, _) = get(&proxy.url("/g")).await;
    assert_eq!(status, 502);
    assert_eq!(
        a.requests() + b.requests(),
        12,
        "the GET was tried on both servers"
    );

    // The route that says bodies may be repeated: the POST goes to the other server when the
    // first closes on it, with its body intact.
    b.set_mode(Mode::Ok);
    let before = (a.posts(), b.posts());
    for i in 0..10 {
        let r = client
            .post(proxy.url(&format!("/safe/{i}")))
            .body("amount=10")
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(b.posts() - before.1, 10);
    println!(
        "figure post-retry: 10 POSTs on a default route reached servers 10 times (502); on a retry_with_body route {} tries made 10 succeed",
        (a.posts() - before.0) + (b.posts() - before.1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_the_extra_load() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.set_mode(Mode::Close);
    b.set_mode(Mode::Close);
    let proxy = Proxy::start(&upstream(
        &[&a, &b],
        "[upstream.app.outlier]\nconsecutive_failures = 0\n\
         [upstream.app.retry]\nattempts = 2\nbudget = 20\nmin_per_second = 0\n",
    ))
    .await;
    for i in 0..100 {
        let (status, _, _) = get(&proxy.url(&format!("/r/{i}"))).await;
        assert_eq!(status, 502);
    }
    let sent = a.requests() + b.requests();
    println!("figure retry-budget: 100 failing GETs with attempts = 2 reached servers {sent} times (without a budget: 200)");
    assert!((100..=121).contains(&sent), "sent {sent}");
    let metrics = proxy.metrics().await;
    assert!(
        !metrics.contains("gatehouse_upstream_retries_refused_total{upstream=\"app\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_servers_answer_503_with_retry_after() {
    let a = Backend::start("a").await;
    a.set_mode(Mode::Slow(Duration::from_millis(1500)));
    let proxy = Proxy::start(&upstream(
        &[&a],
        "max_conns = 1\nmax_pending = 1\nqueue_timeout = \"200ms\"\n",
    ))
    .await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        let url = proxy.url(&format!("/s/{i}"));
        tasks.push(tokio::spawn(async move { get(&url).await }));
        // The first must hold the server before the others arrive.
        if i == 0 {
            a.wait_until(|b| b.requests() == 1).await;
        }
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (status, _, headers) = t.await.expect("task");
        if status == 503 {
            assert_eq!(
                headers.get("retry-after").map(|v| v.as_bytes()),
                Some(&b"1"[..])
            );
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 503, 503]);
    assert_eq!(a.max_active(), 1);
    assert_eq!(a.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_wait_for_a_free_server() {
    let a = Backend::start("q").await;
    a.set_mode(Mode::Slow(Duration::from_millis(50)));
    let proxy = Proxy::start(&upstream(
        &[&a],
        "max_conns = 2\nmax_pending = 50\nqueue_timeout = \"20s\"\n",
    ))
    .await;
    let (ok, failed) = load(&proxy, 40, 10, 0, || {}).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(ok, 40);
    assert!(
        a.max_active() <= 2,
        "max_conns exceeded: {}",
        a.max_active()
    );
    let metrics = proxy.metrics().await;
    assert!(
        !metrics.contains("gatehouse_upstream_queued_total{upstream=\"app\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_serve_only_while_every_primary_is_down() {
    let (a, backup) = (Backend::start("a").await, Backend::start("backup").await);
    let toml = format!(
        "[upstream.app]\nservers = [\"{}\", {{ address = \"{}\", backup = true }}]\n\
         [upstream.app.outlier]\nconsecutive_failures = 1\nbase_ejection = \"300ms\"\n\n{}",
        a.addr(),
        backup.addr(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&toml).await;
    for i in 0..10 {
        let (status, body, _) = get(&proxy.url(&format!("/b/{i}"))).await;
        assert_eq!((status, body.as_str()), (200, "a"));
    }
    a.kill();
    for i in 0..10 {
        let (status, body, _) = get(&proxy.url(&format!("/b/{i}"))).await;
        assert_eq!((status, body.as_str()), (200, "backup"), "request {i}");
    }
    a.restart().await;
    let back = poll_until(Duration::from_secs(20), || async {
        let (_, body, _) = get(&proxy.url("/b/back")).await;
        (body == "a").then_some(())
    })
    .await;
    assert!(back.is_some(), "the primary never took over again");
    let before = backup.requests();
    for i in 0..10 {
        let (_, body, _) = get(&proxy.url(&format!("/b/after/{i}"))).await;
        assert_eq!(body, "a");
    }
    assert_eq!(backup.requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_pins_a_client_to_its_server() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::start(&upstream(&refs, "sticky_cookie = \"GH_SRV\"\n")).await;
    let (status, first, headers) = get(&proxy.url("/")).await;
    assert_eq!(status, 200);
    let set = headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a Set-Cookie on the first response")
        .to_owned();
    assert!(
        set.starts_with("GH_SRV=") && set.contains("HttpOnly"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap_or_default().to_owned();
    let client = client();
    for i in 0..20 {
        let r = client
            .get(proxy.url(&format!("/s/{i}")))
            .header("cookie", format!("theme=dark; {cookie}"))
            .send()
            .await
            .expect("sticky GET");
        assert!(
            r.headers().get("set-cookie").is_none(),
            "the pin holds: no new cookie"
        );
        assert_eq!(r.text().await.expect("body"), first);
    }
    // Its server dies: the client goes elsewhere and is pinned anew.
    let pinned = backends
        .iter()
        .find(|b| b.name() == first)
        .expect("a backend");
    pinned.kill();
    let r = client
        .get(proxy.url("/s/after"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .expect("sticky GET");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_some());
    assert_ne!(r.text().await.expect("body"), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_endpoint_and_metrics_show_every_server() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let toml = format!(
        "[upstream.app]\nservers = [\"{}\", {{ address = \"{}\", drain = true, max_conns = 7 }}]\n\
         balance = \"least_requests\"\n\n{}",
        a.addr(),
        b.addr(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&toml).await;
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/")).await.0, 200);
    }
    assert_eq!(b.requests(), 0, "a draining server takes no new requests");
    let json = upstreams_json(&proxy).await;
    let up = &json["upstreams"][0];
    assert_eq!(up["name"], "app");
    assert_eq!(up["balance"], "least_requests");
    assert_eq!(up["servers"][0]["state"], "healthy");
    assert_eq!(up["servers"][0]["requests"], 5);
    assert!(up["servers"][0]["latency_ewma_ms"].is_number(), "{json:#}");
    assert_eq!(up["servers"][1]["state"], "draining");
    assert_eq!(up["servers"][1]["max_conns"], 7);
    let metrics = proxy.metrics().await;
    for line in [
        format!(
            "gatehouse_upstream_server_state{{upstream=\"app\",server=\"{}\",state=\"healthy\"}} 1",
            a.addr()
        ),
        format!(
            "gatehouse_upstream_server_state{{upstream=\"app\",server=\"{}\",state=\"draining\"}} 1",
            b.addr()
        ),
        format!(
            "gatehouse_upstream_server_requests_total{{upstream=\"app\",server=\"{}\"}} 5",
            a.addr()
        ),
        "gatehouse_upstream_pending{upstream=\"app\"} 0".to_owned(),
    ] {
        assert!(metrics.contains(&line), "missing {line}\n{metrics}");
    }
}

// Side by side with nginx: the same failures under the same load, through Gatehouse and through
// nginx 1.22 open source with its default failure handling (`max_fails=1 fail_timeout=10s`,
// `proxy_next_upstream error timeout`) and its closest balancer. Ignored by default (CI does not
// install nginx); `bash bench/resilience.sh` runs them and writes docs/resilience.md.

/// An nginx in front of `backends`, with `directives` inside `upstream {}` and `location {}`
/// extras; killed on drop.
struct Nginx {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(
        backends: &[&Backend],
        upstream_extra: &str,
        location_extra: &str,
    ) -> Option<Nginx> {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().expect("nginx temp dir");
        let port = crate::support::closed_port();
        let servers: String = backends
            .iter()
            .map(|b| format!("    server {};\n", b.addr()))
            .collect();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             upstream app {{\n{servers}{upstream_extra}    keepalive 128;\n  }}\n\
             server {{\n    listen {port};\n    location / {{\n      proxy_pass http://app;\n\
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{location_extra}    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("writing nginx.conf");
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting nginx");
        let url = format!("http://{port}/load");
        let up = poll_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(port).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "nginx did not start listening");
        Some(Nginx {
            child,
            url,
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn report(scenario: &str, proxy: &str, run: &Load, backends: &[&Backend], extra: &str) {
    let shares: Vec<String> = backends
        .iter()
        .map(|b| format!("{}={}", b.name(), b.requests()))
        .collect();
    println!(
        "sidebyside | {scenario} | {proxy} | {} | {} | {:.2}% | {:.1} | {:.1} | {} | {extra}",
        run.ok + run.failures.len(),
        run.failures.len(),
        run.failures.len() as f64 * 100.0 / (run.ok + run.failures.len()).max(1) as f64,
        run.percentile(0.5).as_secs_f64() * 1000.0,
        run.percentile(0.99).as_secs_f64() * 1000.0,
        shares.join(" "),
    );
}

async fn three() -> [Backend; 3] {
    [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ]
}

/// One failure, as both proxies get it.
struct Scenario {
    name: &'static str,
    total: usize,
    /// Extra `[upstream.app]` keys for Gatehouse.
    gatehouse: &'static str,
    /// Extra lines in nginx's `upstream {}` and `location {}`.
    nginx_upstream: &'static str,
    nginx_location: &'static str,
    /// Sets the backends up before the load starts.
    prepare: fn(&[Backend; 3]),
    /// Breaks a backend once a third of the requests are done.
    midway: fn(&[Backend; 3]),
}

/// Runs `s` once through Gatehouse and once through nginx, each on fresh backends, from 8
/// concurrent clients.
async fn side_by_side(s: Scenario) {
    let backends = three().await;
    (s.prepare)(&backends);
    let refs: Vec<&Backend> = backends.iter().collect();
    let proxy = Proxy::start(&upstream(&refs, s.gatehouse)).await;
    let run = load_url(&proxy.url("/load"), s.total, 8, s.total / 3, || {
        (s.midway)(&backends)
    })
    .await;
    let slow = format!("slow>1s: {}", run.slower_than(Duration::from_secs(1)));
    report(s.name, "gatehouse", &run, &refs, &slow);
    drop(proxy);

    let backends = three().await;
    (s.prepare)(&backends);
    let refs: Vec<&Backend> = backends.iter().collect();
    let Some(nginx) = Nginx::start(&refs, s.nginx_upstream, s.nginx_location).await else {
        println!("sidebyside | {} | nginx | not installed", s.name);
        return;
    };
    let run = load_url(&nginx.url, s.total, 8, s.total / 3, || {
        (s.midway)(&backends)
    })
    .await;
    let slow = format!("slow>1s: {}", run.slower_than(Duration::from_secs(1)));
    report(s.name, "nginx", &run, &refs, &slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/resilience.sh"]
async fn side_by_side_kill_one_of_three() {
    side_by_side(Scenario {
        name: "kill 1 of 3 mid-run",
        total: 30_000,
        gatehouse: "",
        nginx_upstream: "",
        nginx_location: "",
        prepare: |_| {},
        midway: |b| b[1].kill(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/resilience.sh"]
async fn side_by_side_hang_one_of_three() {
    // Both get the same one-second limit per try and move on to another server after it.
    side_by_side(Scenario {
        name: "hang 1 of 3 mid-run",
        total: 60_000,
        gatehouse: "[upstream.app.retry]
per_try_timeout = \"1s\"
",
        nginx_upstream: "",
        nginx_location: "      proxy_read_timeout 1s;
",
        prepare: |_| {},
        midway: |b| b[1].set_mode(Mode::Hang),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/resilience.sh"]
async fn side_by_side_one_server_answers_503() {
    side_by_side(Scenario {
        name: "1 of 3 answers 503 mid-run",
        total: 30_000,
        gatehouse: "",
        nginx_upstream: "",
        nginx_location: "",
        prepare: |_| {},
        midway: |b| b[1].set_mode(Mode::Status(503)),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/resilience.sh"]
async fn side_by_side_one_slow_server() {
    // nginx open source has no latency-aware balancer; least_conn is its closest.
    side_by_side(Scenario {
        name: "1 of 3 slow (40 ms)",
        total: 30_000,
        gatehouse: "balance = \"peak_ewma\"
",
        nginx_upstream: "    least_conn;
",
        nginx_location: "",
        prepare: |b| b[1].set_mode(Mode::Slow(Duration::from_millis(40))),
        midway: |_| {},
    })
    .await;
}
