//! TLS to upstreams: certificates verified against the CA the config names (a wrong CA is a
//! 502, never a request sent), SNI and the verified name from `server_name` or the server's IP,
//! `verify = false`, client certificates (mTLS) presented when the server asks, pooled TLS
//! connections reused, health checks over TLS, and `check` naming bad files.

use std::net::SocketAddr;

use crate::support::certs::TestCa;
use crate::support::h2::H2Upstream;
use crate::support::http_upstream::{echo, Body, Handshake};
use crate::support::proxy::metric_value;
use crate::support::{client, gatehouse_check, poll_until, route_toml, Echo, HttpUpstream, Proxy};

/// `[upstream.app]` at `server` over TLS with the `tls` table's contents, and the route to it.
fn config(server: SocketAddr, tls: &str) -> String {
    format!(
        "[upstream.app]\nservers = [\"{server}\"]\ntls = {{ {tls} }}\n\n{}",
        route_toml("/", "app")
    )
}

async fn get(proxy: &Proxy, path: &str) -> (u16, String) {
    let resp = client()
        .get(proxy.url(path))
        .send()
        .await
        .expect("request through Gatehouse");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_a_tls_upstream_verified_by_the_named_ca_over_one_pooled_connection() {
    let ca = TestCa::new();
    let leaf = ca.leaf("upstream", &["app.internal"]);
    let upstream = HttpUpstream::start_tls(ca.server(&leaf, None), echo).await;
    let ca_file = ca.pem_file();
    let tls = format!(
        "ca = \"{}\", server_name = \"app.internal\"",
        ca_file.display()
    );
    let proxy = Proxy::start(&config(upstream.addr(), &tls)).await;

    for path in ["/a", "/b", "/c"] {
        let (status, body) = get(&proxy, path).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(Echo::parse(&body).target, path);
    }
    assert_eq!(upstream.requests(), 3);
    // One TLS connection, kept warm in the pool and reused.
    assert_eq!(upstream.connections(), 1);
    assert_eq!(
        upstream.handshakes(),
        vec![Handshake {
            sni: Some("app.internal".to_owned()),
            client_cert: false
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_server_name_the_certificate_must_hold_the_servers_ip() {
    let ca = TestCa::new();
    let by_ip = ca.leaf("by-ip", &["127.0.0.1"]);
    let by_name = ca.leaf("by-name", &["app.internal"]);
    let ca_file = ca.pem_file();
    let tls = format!("ca = \"{}\"", ca_file.display());

    let good = HttpUpstream::start_tls(ca.server(&by_ip, None), echo).await;
    let proxy = Proxy::start(&config(good.addr(), &tls)).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 200, "{body}");
    // No SNI for an IP address (RFC 6066 allows host names only).
    assert_eq!(good.handshakes()[0].sni, None);
    drop(proxy);

    let wrong = HttpUpstream::start_tls(ca.server(&by_name, None), echo).await;
    let proxy = Proxy::start(&config(wrong.addr(), &tls)).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(wrong.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_with_502_and_counted() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let leaf = other.leaf("upstream", &["app.internal"]);
    let upstream = HttpUpstream::start_tls(other.server(&leaf, None), echo).await;
    let ca_file = ca.pem_file();
    let tls = format!(
        "ca = \"{}\", server_name = \"app.internal\"",
        ca_file.display()
    );
    let proxy = Proxy::start(&config(upstream.addr(), &tls)).await;

    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        upstream.requests(),
        0,
        "nothing is sent to an unverified server"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "gatehouse_upstream_errors_total{upstream=\"app\",kind=\"tls\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    // The same server, verification off: served.
    let proxy = Proxy::start(&config(upstream.addr(), "verify = false")).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_server_behind_a_tls_upstream_is_a_502() {
    let plain = HttpUpstream::echo().await;
    let proxy = Proxy::start(&config(plain.addr(), "verify = false")).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(plain.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_server_requires_one() {
    let ca = TestCa::new();
    let clients = TestCa::new();
    let leaf = ca.leaf("upstream", &["app.internal"]);
    let upstream = HttpUpstream::start_tls(ca.server(&leaf, Some(&clients)), echo).await;
    let ca_file = ca.pem_file();
    let base = format!(
        "ca = \"{}\", server_name = \"app.internal\"",
        ca_file.display()
    );

    // Without a client certificate the server refuses the handshake.
    let proxy = Proxy::start(&config(upstream.addr(), &base)).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(upstream.requests(), 0);
    drop(proxy);

    // A certificate from another CA: refused too.
    let stranger = ca.leaf("stranger", &["gatehouse.client"]);
    let tls = format!(
        "{base}, client_cert = \"{}\", client_key = \"{}\"",
        stranger.cert.display(),
        stranger.key.display()
    );
    let proxy = Proxy::start(&config(upstream.addr(), &tls)).await;
    let (status, _) = get(&proxy, "/").await;
    assert_eq!(status, 502);
    drop(proxy);

    let mine = clients.leaf("gatehouse", &["gatehouse.client"]);
    let tls = format!(
        "{base}, client_cert = \"{}\", client_key = \"{}\"",
        mine.cert.display(),
        mine.key.display()
    );
    let proxy = Proxy::start(&config(upstream.addr(), &tls)).await;
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.requests(), 1);
    assert!(upstream.handshakes().iter().any(|h| h.client_cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_go_over_tls_too() {
    let ca = TestCa::new();
    let leaf = ca.leaf("upstream", &["app.internal"]);
    let upstream = HttpUpstream::start_tls(ca.server(&leaf, None), echo).await;
    let ca_file = ca.pem_file();
    let tables = format!(
        "[upstream.app]\nservers = [\"{}\"]\ntls = {{ ca = \"{}\", server_name = \"app.internal\" }}\n\
         [upstream.app.health_check]\npath = \"/healthz\"\ninterval = \"50ms\"\nrise = 1\nfall = 1\n\n{}",
        upstream.addr(),
        ca_file.display(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&tables).await;
    // Several rounds of checks, each answered 200 over TLS: the server stays in rotation.
    let checked = poll_until(std::time::Duration::from_secs(10), || async {
        (upstream.requests() >= 3).then_some(())
    })
    .await;
    assert!(checked.is_some(), "health checks reached the TLS server");
    let (status, body) = proxy.admin_get("/upstreams").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"healthy\""), "{body}");
    let (status, body) = get(&proxy, "/").await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn check_reports_bad_upstream_tls_settings_at_the_value() {
    let ca = TestCa::new();
    let leaf = ca.leaf("client", &["client.test"]);
    let missing = ca.path("missing.pem");
    let garbage = ca.path("garbage.pem");
    std::fs::write(&garbage, "no PEM here\n").expect("write garbage");
    let listener = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\n";
    let upstream = "127.0.0.1:9".parse().expect("addr");
    let cases = [
        (format!("ca = \"{}\"", missing.display()), "cannot read"),
        (
            format!("ca = \"{}\"", garbage.display()),
            "no PEM certificate",
        ),
        (
            format!("client_cert = \"{}\"", leaf.cert.display()),
            "needs tls.client_key",
        ),
        (
            format!(
                "client_cert = \"{}\", client_key = \"{}\"",
                leaf.cert.display(),
                garbage.display()
            ),
            "no PEM private key",
        ),
        (
            "server_name = \"not a name\"".to_owned(),
            "not a valid server name",
        ),
        (
            format!("verify = false, ca = \"{}\"", leaf.cert.display()),
            "no effect",
        ),
    ];
    for (tls, says) in cases {
        let (code, output, path) =
            gatehouse_check(&format!("{listener}{}", config(upstream, &tls)));
        assert_eq!(code, Some(1), "{tls}: {output}");
        // Line 7 is the upstream's `tls = { ... }`.
        let line = output
            .lines()
            .find(|l| l.starts_with(&format!("{path}:7:")))
            .unwrap_or_else(|| panic!("no diagnostic on line 7 for {tls}: {output}"));
        assert!(line.contains(says), "{line} should say {says:?}");
    }
    let (code, output, _) =
        gatehouse_check(&format!("{listener}{}", config(upstream, "verify = false")));
    assert_eq!(code, Some(0), "{output}");
}

/// Answers with the HTTP version the request came in, after reading its body.
async fn version_h2(req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
    use http_body_util::BodyExt;
    let version = format!("{:?}", req.version());
    let _ = req.into_body().collect().await;
    crate::support::http_upstream::text_response(200, &version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_over_tls_is_verified_and_shared_by_every_request() {
    let ca = TestCa::new();
    let leaf = ca.leaf("upstream", &["grpc.internal"]);
    let upstream = H2Upstream::start_tls(ca.server(&leaf, None), version_h2).await;
    let tables = format!(
        "[upstream.app]\nservers = [\"{}\"]\nprotocol = \"h2\"\n\
         tls = {{ ca = \"{}\", server_name = \"grpc.internal\" }}\n\n{}",
        upstream.addr(),
        ca.pem_file().display(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&tables).await;
    let gets = (0..6).map(|i| {
        let url = proxy.url(&format!("/{i}"));
        async move { client().get(url).send().await.expect("request") }
    });
    for resp in futures_util::future::join_all(gets).await {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("body"), "HTTP/2.0");
    }
    assert_eq!(upstream.requests(), 6);
    assert_eq!(upstream.connections(), 1, "one multiplexed TLS connection");

    // A server whose certificate this CA did not sign: no stream is opened on it.
    let other = TestCa::new();
    let stranger = other.leaf("stranger", &["grpc.internal"]);
    let wrong = H2Upstream::start_tls(other.server(&stranger, None), version_h2).await;
    let proxy =
        Proxy::start(&tables.replace(&upstream.addr().to_string(), &wrong.addr().to_string()))
            .await;
    let resp = client().get(proxy.url("/")).send().await.expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(wrong.requests(), 0);
}
