//! Servers given by DNS name: resolved at start, re-resolved on their TTL, following the answers
//! without a reload, and kept when DNS fails.
//!
//! The name server is `support::dns`, a table the test edits while Gatehouse runs. The servers
//! behind one name share a port on different loopback addresses (127.0.0.2, 127.0.0.3), as the
//! replicas of one service do on different hosts; each answers with its own address, and counts.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use crate::support::dns::{self, DnsServer, Mode};
use crate::support::http_upstream::text_response;
use crate::support::{client, poll_until, route_toml, within, Proxy, STEP_TIMEOUT};

const NAME: &str = "app.test";
const IP2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const IP3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// An HTTP server on one loopback address that answers 200 with that address. Aborted on drop.
struct Backend {
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(listener: TcpListener, ip: IpAddr) -> Backend {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    let body = ip.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (counter, body) = (Arc::clone(&counter), body.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let resp = text_response(200, &body);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { requests, task }
}

/// Binds one server on each of `ips`, all on one port: the first address picks a free port and
/// the others take it. The first `required` addresses must bind (a port that another test holds
/// on one of them is given up for a new one); any later one that cannot is left out (`None`).
async fn backends_on_one_port(ips: &[IpAddr], required: usize) -> (u16, Vec<Option<Backend>>) {
    for _ in 0..20 {
        let first = TcpListener::bind(SocketAddr::new(ips[0], 0))
            .await
            .expect("binding a backend");
        let port = first.local_addr().expect("backend address").port();
        let mut listeners = vec![Some(first)];
        let mut complete = true;
        for (i, ip) in ips.iter().enumerate().skip(1) {
            match TcpListener::bind(SocketAddr::new(*ip, port)).await {
                Ok(l) => listeners.push(Some(l)),
                Err(_) if i >= required => listeners.push(None),
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            let backends = listeners
                .into_iter()
                .zip(ips)
                .map(|(l, ip)| l.map(|l| serve(l, *ip)))
                .collect();
            return (port, backends);
        }
    }
    panic!("no port free on all of {ips:?} after 20 tries");
}

/// 127.0.0.2:P and 127.0.0.3:P.
async fn two_backends() -> (u16, Backend, Backend) {
    let (port, backends) = backends_on_one_port(&[IP2.into(), IP3.into()], 2).await;
    let mut it = backends.into_iter().flatten();
    match (it.next(), it.next()) {
        (Some(b2), Some(b3)) => (port, b2, b3),
        _ => panic!("both backends are required"),
    }
}

/// `[resolver]` pointing at `dns` (re-resolution at least every second), and `app` served by
/// `NAME:port`.
fn config(dns: &DnsServer, port: u16, max_ttl: &str) -> String {
    format!(
        "{}[upstream.app]\nservers = [\"{NAME}:{port}\"]\n\n{}",
        dns.resolver_toml("500ms", "100ms", max_ttl),
        route_toml("/", "app")
    )
}

/// GETs `/` `n` times, one after another; every answer must be 200. Returns the bodies.
async fn batch(http: &reqwest::Client, proxy: &Proxy, n: usize) -> Vec<String> {
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let resp = within(
            "a request through the proxy",
            http.get(proxy.url("/")).send(),
        )
        .await
        .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "request {i} answered {status}: {body}");
        bodies.push(body);
    }
    bodies
}

fn count(bodies: &[String], ip: Ipv4Addr) -> usize {
    let ip = ip.to_string();
    bodies.iter().filter(|b| **b == ip).count()
}

/// Waits until `dns` has seen `more` queries for `NAME` beyond `from`.
async fn wait_for_queries(dns: &DnsServer, from: usize, more: usize) {
    let seen = poll_until(STEP_TIMEOUT, || async {
        (dns.queries_for(NAME) >= from + more).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the DNS server saw {} queries for {NAME}, expected at least {}",
        dns.queries_for(NAME),
        from + more
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_fixture_answers_a_and_ignores_malformed_queries() {
    let server = DnsServer::start().await;
    server.set(NAME, &[IP2, IP3], 7);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server.addr()).await.unwrap();
    let mut pointer = dns::query(9, NAME, 1);
    pointer[12] = 0xC0;
    let mut response_flag = dns::query(9, NAME, 1);
    response_flag[2] |= 0x80;
    for garbage in [
        &b""[..],
        &[0u8; 3][..],
        &[0xffu8; 40][..],
        &pointer[..],
        &response_flag[..],
        &dns::query(9, NAME, 1)[..20],
    ] {
        socket.send(garbage).await.unwrap();
    }
    let ask = |id: u16, name: &'static str, qtype: u16| {
        let socket = &socket;
        async move {
            socket.send(&dns::query(id, name, qtype)).await.unwrap();
            let mut buf = [0u8; 512];
            let len = within("a DNS answer", socket.recv(&mut buf)).await.unwrap();
            buf[..len].to_vec()
        }
    };
    let a = ask(1, NAME, 1).await;
    // Only the well-formed query got an answer, and it is the first thing read back.
    assert_eq!(&a[..2], &1u16.to_be_bytes());
    assert_eq!(a[3] & 0x0f, 0, "NOERROR");
    assert_eq!(&a[6..8], &2u16.to_be_bytes(), "two answers");
    assert_eq!(&a[a.len() - 4..], &IP3.octets());
    let aaaa = ask(2, NAME, 28).await;
    assert_eq!((aaaa[3] & 0x0f, &aaaa[6..8]), (0, &[0u8, 0][..]));
    let unknown = ask(3, "nope.test", 1).await;
    assert_eq!(unknown[3] & 0x0f, 3, "NXDOMAIN");
    assert_eq!(server.queries(), 3);
    assert_eq!(server.queries_for(NAME), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_resolved_before_the_first_request() {
    let dns = DnsServer::start().await;
    let (port, b2, b3) = two_backends().await;
    dns.set(NAME, &[IP2], 1);
    let proxy = Proxy::start(&config(&dns, port, "1s")).await;
    let http = client();
    let bodies = batch(&http, &proxy, 10).await;
    assert_eq!(count(&bodies, IP2), 10, "{bodies:?}");
    assert_eq!((b2.requests(), b3.requests()), (10, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_added_to_the_answer_joins_without_a_reload() {
    let dns = DnsServer::start().await;
    let (port, b2, b3) = two_backends().await;
    dns.set(NAME, &[IP2], 1);
    let proxy = Proxy::start(&config(&dns, port, "1s")).await;
    let http = client();
    assert_eq!(count(&batch(&http, &proxy, 4).await, IP2), 4);

    dns.set(NAME, &[IP2, IP3], 1);
    let joined = poll_until(STEP_TIMEOUT, || async {
        batch(&http, &proxy, 4).await;
        (b3.requests() > 0).then_some(())
    })
    .await;
    assert!(joined.is_some(), "127.0.0.3 never got a request");
    let bodies = batch(&http, &proxy, 20).await;
    assert!(
        count(&bodies, IP2) > 0 && count(&bodies, IP3) > 0,
        "both addresses take requests once both are in the answer: {bodies:?}"
    );
    assert!(b2.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_removed_from_the_answer_stops_getting_requests() {
    let dns = DnsServer::start().await;
    let (port, b2, b3) = two_backends().await;
    dns.set(NAME, &[IP2, IP3], 1);
    let proxy = Proxy::start(&config(&dns, port, "1s")).await;
    let http = client();
    let bodies = batch(&http, &proxy, 10).await;
    assert!(
        count(&bodies, IP2) > 0 && count(&bodies, IP3) > 0,
        "{bodies:?}"
    );

    // Every request of every batch, during the switch too, must succeed (`batch` checks).
    dns.set(NAME, &[IP3], 1);
    let switched = poll_until(STEP_TIMEOUT, || async {
        let bodies = batch(&http, &proxy, 10).await;
        (count(&bodies, IP3) == bodies.len()).then_some(())
    })
    .await;
    assert!(switched.is_some(), "127.0.0.2 kept getting requests");
    let (before2, before3) = (b2.requests(), b3.requests());
    let bodies = batch(&http, &proxy, 30).await;
    assert_eq!(count(&bodies, IP3), 30, "{bodies:?}");
    assert_eq!(
        b2.requests(),
        before2,
        "127.0.0.2 got requests after leaving the answer"
    );
    assert_eq!(b3.requests(), before3 + 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_keep_the_last_good_addresses() {
    let dns = DnsServer::start().await;
    let (port, b2, _b3) = two_backends().await;
    dns.set(NAME, &[IP2], 1);
    let proxy = Proxy::start(&config(&dns, port, "1s")).await;
    let http = client();
    assert_eq!(count(&batch(&http, &proxy, 4).await, IP2), 4);

    // NXDOMAIN, then SERVFAIL, then no answer at all (a name server that is down). A lookup is
    // A and AAAA at once, and the resolver tries each three times on SERVFAIL: the query counts
    // below are one lookup's worth that may have begun before the failure, one whole lookup
    // after it, and the first query of the next, which begins only once that one has ended.
    let failures: [(&str, &dyn Fn(), usize); 3] = [
        ("NXDOMAIN", &|| dns.remove(NAME), 5),
        ("SERVFAIL", &|| dns.set_mode(Mode::ServFail), 12),
        ("no answer", &|| dns.set_mode(Mode::Silent), 5),
    ];
    for (what, fail, more) in failures {
        fail();
        let from = dns.queries_for(NAME);
        // Requests all along, so that every moment of the failure is covered, not just its end.
        let waited = poll_until(STEP_TIMEOUT, || async {
            let bodies = batch(&http, &proxy, 1).await;
            assert_eq!(count(&bodies, IP2), 1, "during {what}: {bodies:?}");
            (dns.queries_for(NAME) >= from + more).then_some(())
        })
        .await;
        assert!(
            waited.is_some(),
            "during {what}: the DNS server saw {} queries for {NAME}, expected at least {}",
            dns.queries_for(NAME),
            from + more
        );
        let bodies = batch(&http, &proxy, 10).await;
        assert_eq!(count(&bodies, IP2), 10, "after {what}: {bodies:?}");
    }

    // The name server gone for good: its port closed. Requests over a few retry periods still
    // reach the last good address.
    let served = b2.requests();
    drop(dns);
    // Nothing to count any more: the pacing spans a few retry periods (one second each here).
    for _ in 0..10 {
        let bodies = batch(&http, &proxy, 2).await;
        assert_eq!(
            count(&bodies, IP2),
            2,
            "with the name server gone: {bodies:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(b2.requests(), served + 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_resolved_again_when_their_ttl_runs_out() {
    let dns = DnsServer::start().await;
    let (port, _b2, _b3) = two_backends().await;
    dns.set(NAME, &[IP2], 1);
    // `max_ttl` far above the record's TTL: only the TTL can bring the lookups back this soon.
    let proxy = Proxy::start(&config(&dns, port, "1m")).await;
    let after_start = dns.queries_for(NAME);
    assert!(after_start >= 2, "A and AAAA were asked at start");
    wait_for_queries(&dns, after_start, 6).await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_resolves_from_the_system_configuration() {
    // Both loopback families on one port, so whichever the hosts file lists answers; the IPv6
    // one is optional, for machines without it.
    let ips = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let (port, backends) = backends_on_one_port(&ips, 1).await;
    // No [resolver]: the system's configuration, whose hosts file answers for localhost before
    // any name server is asked.
    let proxy = Proxy::start(&format!(
        "[upstream.app]\nservers = [\"localhost:{port}\"]\n\n{}",
        route_toml("/", "app")
    ))
    .await;
    let resp = within("GET through localhost", client().get(proxy.url("/")).send())
        .await
        .expect("a response from the proxy");
    let status = resp.status().as_u16();
    if status != 200 {
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let listed = hosts
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .any(|l| l.split_whitespace().skip(1).any(|n| n == "localhost"));
        if !listed {
            println!(
                "note: skipping: this machine's hosts file does not list localhost ({status})"
            );
            return;
        }
        panic!("localhost:{port} answered {status}, though the hosts file lists localhost");
    }
    let body = resp.text().await.unwrap_or_default();
    assert!(body == "127.0.0.1" || body == "::1", "{body}");
    let served: usize = backends.iter().flatten().map(Backend::requests).sum();
    assert_eq!(served, 1);
}
