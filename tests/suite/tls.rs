//! TLS termination on a listener: requests over TLS 1.2 and 1.3, SNI choosing among
//! certificates (exact, wildcard, default), session resumption, certificates re-read on reload,
//! bad certificate files reported by `check`, and a plaintext client turned away without harm.
//!
//! Certificates are made at test time by `support::certs`; the client is rustls through
//! tokio-rustls, speaking HTTP/1.1 by hand so that every test sees which certificate, protocol
//! version and handshake kind the connection got.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{HandshakeKind, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::support::certs::{Leaf, TestCa};
use crate::support::proxy::metric_value;
use crate::support::{
    gatehouse_check, poll_until, route_toml, upstream_toml, within, Echo, HttpUpstream, Proxy,
};

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// A config whose `web` listener terminates TLS with `tls` (a `{ cert, key }` or a list of
/// them) and sends everything to `upstream`.
fn tls_config(tls: &str, upstream: SocketAddr) -> String {
    format!(
        "[log]\naccess = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ntls = {tls}\n\n{}{}",
        upstream_toml("app", &[upstream]),
        route_toml("/", "app"),
    )
}

/// One TLS connection to Gatehouse, speaking HTTP/1.1 keep-alive.
struct Conn {
    stream: TlsStream<TcpStream>,
    /// Bytes read past the last response.
    buffered: Vec<u8>,
}

impl Conn {
    async fn open(
        addr: SocketAddr,
        name: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(name.to_owned()).expect("a valid server name");
        let stream = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(Conn {
            stream,
            buffered: Vec::new(),
        })
    }

    fn session(&self) -> &rustls::ClientConnection {
        self.stream.get_ref().1
    }

    /// The end-entity certificate the server presented.
    fn peer_cert(&self) -> CertificateDer<'static> {
        self.session()
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("the server presented a certificate")
            .clone()
            .into_owned()
    }

    /// Sends `GET path` and reads one response; returns (status, body).
    async fn get(&mut self, path: &str) -> (u16, String) {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n");
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("writing a request");
        let head_end = loop {
            if let Some(at) = find(&self.buffered, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length in {head:?}"));
        while self.buffered.len() < head_end + len {
            self.fill().await;
        }
        let body = String::from_utf8_lossy(&self.buffered[head_end..head_end + len]).into_owned();
        self.buffered.drain(..head_end + len);
        (status, body)
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .expect("reading a response");
        assert!(n > 0, "the connection closed mid-response");
        self.buffered.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Opens a connection within the step timeout.
async fn connect(addr: SocketAddr, name: &str, config: &Arc<rustls::ClientConfig>) -> Conn {
    within("TLS connect", Conn::open(addr, name, Arc::clone(config)))
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {name}: {e}"))
}

/// A client limited to one protocol version.
fn client_for(
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("CA into the root store");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_tls_reaches_the_upstream_marked_https() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&tls_config(&leaf.toml(), upstream.addr())).await;

    let client = ca.client(&[b"http/1.1"]);
    let mut conn = connect(proxy.addr(), "gatehouse.test", &client).await;
    assert_eq!(conn.session().alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(conn.peer_cert(), leaf.der);

    for path in ["/one", "/two"] {
        let (status, body) = within("GET over TLS", conn.get(path)).await;
        assert_eq!(status, 200, "{body}");
        let echo = Echo::parse(&body);
        assert_eq!(echo.target, path);
        assert_eq!(echo.header("x-forwarded-proto"), Some("https"), "{body}");
    }
    // Both requests on the one TLS connection.
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_both_served() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&tls_config(&leaf.toml(), upstream.addr())).await;

    for (version, expect) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let mut conn = connect(proxy.addr(), "gatehouse.test", &client_for(&ca, version)).await;
        assert_eq!(conn.session().protocol_version(), Some(expect));
        let (status, body) = within("GET over TLS", conn.get("/")).await;
        assert_eq!(status, 200, "{expect:?}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_exact_name_then_the_wildcard_then_the_default() {
    let ca = TestCa::new();
    let first = ca.leaf("first", &["first.test"]);
    let exact = ca.leaf("exact", &["api.example.test"]);
    let wildcard = ca.leaf("wildcard", &["*.example.test"]);
    let upstream = HttpUpstream::echo().await;
    let tls = format!("[{}, {}, {}]", first.toml(), wildcard.toml(), exact.toml());
    let proxy = Proxy::start_toml(&tls_config(&tls, upstream.addr())).await;

    // Verification is by the CA and the name; the default certificate cannot match a name it
    // does not hold, so those cases skip verification and compare certificates directly.
    let verifying = ca.client(&[]);
    let any_name = any_name_client(true);
    let no_sni = any_name_client(false);
    let cases: [(&str, &Arc<rustls::ClientConfig>, &Leaf, &str); 6] = [
        ("first.test", &verifying, &first, "an exact name"),
        (
            "api.example.test",
            &verifying,
            &exact,
            "exact beats wildcard",
        ),
        (
            "www.example.test",
            &verifying,
            &wildcard,
            "one label under the wildcard",
        ),
        (
            "WWW.Example.TEST",
            &verifying,
            &wildcard,
            "names compare without case",
        ),
        (
            "a.b.example.test",
            &any_name,
            &first,
            "a wildcard covers one label only",
        ),
        ("first.test", &no_sni, &first, "no SNI at all"),
    ];
    for (name, client, want, why) in cases {
        let mut conn = connect(proxy.addr(), name, client).await;
        assert!(
            conn.peer_cert() == want.der,
            "{name}: {why}: wrong certificate"
        );
        let (status, _) = within("GET over TLS", conn.get("/")).await;
        assert_eq!(status, 200, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_resumes_the_session() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&tls_config(&leaf.toml(), upstream.addr())).await;

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client config, so one session store, for both connections.
        let client = client_for(&ca, version);
        let mut first = connect(proxy.addr(), "gatehouse.test", &client).await;
        assert_eq!(first.session().handshake_kind(), Some(HandshakeKind::Full));
        // A whole exchange: TLS 1.3 tickets arrive after the handshake.
        let (status, _) = within("GET over TLS", first.get("/")).await;
        assert_eq!(status, 200);
        drop(first);

        let mut second = connect(proxy.addr(), "gatehouse.test", &client).await;
        assert_eq!(
            second.session().handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{version:?}"
        );
        let (status, _) = within("GET over TLS", second.get("/")).await;
        assert_eq!(status, 200);
    }

    // A reload builds new TLS configs; sessions and ticket keys outlive it.
    let client = client_for(&ca, &rustls::version::TLS13);
    let mut before = connect(proxy.addr(), "gatehouse.test", &client).await;
    let (status, _) = within("GET over TLS", before.get("/")).await;
    assert_eq!(status, 200);
    drop(before);
    let (status, body) = proxy.reload().await;
    assert_eq!(status, 200, "{body}");
    let after = connect(proxy.addr(), "gatehouse.test", &client).await;
    assert_eq!(
        after.session().handshake_kind(),
        Some(HandshakeKind::Resumed),
        "resumed across a reload"
    );
}

/// `openssl s_client` offering only `version` (e.g. `-tls1_1`); true when a handshake was
/// completed. The machine's OpenSSL must be able to offer that version, so the test below also
/// checks that it can complete a TLS 1.2 handshake the same way.
fn openssl_handshake(addr: SocketAddr, version: &str) -> bool {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), version])
        .args(["-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running openssl s_client (CI installs openssl)");
    let text = String::from_utf8_lossy(&out.stdout);
    // s_client prints the negotiated cipher once a handshake is done: "Cipher is X", or
    // "Cipher is (NONE)" when it failed.
    text.lines()
        .any(|l| l.contains("Cipher is") && !l.contains("(NONE)"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_and_1_0_are_refused_by_the_handshake() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&tls_config(&leaf.toml(), upstream.addr())).await;
    let addr = proxy.addr();
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1_2", "-tls1_1", "-tls1"].map(|v| (v, openssl_handshake(addr, v)))
    })
    .await
    .expect("openssl runs");
    assert_eq!(
        results,
        [("-tls1_2", true), ("-tls1_1", false), ("-tls1", false)]
    );
    assert_eq!(upstream.requests(), 0);
}

#[test]
fn relative_certificate_files_start_from_the_config_files_directory() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let config = ca.path("gatehouse.toml");
    std::fs::write(
        &config,
        tls_config("{ cert = \"site.crt\", key = \"site.key\" }", upstream),
    )
    .expect("write config");
    assert!(leaf.cert.ends_with("site.crt"));
    // Run from elsewhere: the names must not be taken from the working directory.
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("running gatehouse check");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_turned_away_and_counted() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&tls_config(&leaf.toml(), upstream.addr())).await;

    let mut plain = TcpStream::connect(proxy.addr()).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n")
        .await
        .expect("write");
    // Whatever comes back (an alert, or nothing) is not an HTTP response, and then it closes.
    let mut answer = Vec::new();
    let _ = within("plaintext close", plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    assert_eq!(upstream.requests(), 0);

    let counted = poll_until(std::time::Duration::from_secs(10), || async {
        let m = proxy.metrics().await;
        (metric_value(&m, "gatehouse_tls_handshake_failures_total") == Some(1.0)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "{}", proxy.metrics().await);

    let mut conn = connect(proxy.addr(), "gatehouse.test", &ca.client(&[])).await;
    let (status, _) = within("GET over TLS", conn.get("/")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_certificate_files_again() {
    let ca = TestCa::new();
    let old = ca.leaf("old", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    // The config names files that the renewal below overwrites, as certbot does.
    let live = ca.leaf("live", &["gatehouse.test"]);
    std::fs::copy(&old.cert, &live.cert).expect("copy cert");
    std::fs::copy(&old.key, &live.key).expect("copy key");
    let proxy = Proxy::start_toml(&tls_config(&live.toml(), upstream.addr())).await;
    let client = ca.client(&[]);

    let mut before = connect(proxy.addr(), "gatehouse.test", &client).await;
    assert!(before.peer_cert() == old.der);

    let renewed = ca.leaf("renewed", &["gatehouse.test"]);
    std::fs::copy(&renewed.cert, &live.cert).expect("copy cert");
    std::fs::copy(&renewed.key, &live.key).expect("copy key");
    let (status, body) = proxy.reload().await;
    assert_eq!(status, 200, "{body}");

    // A fresh client each time: one that resumes a session gets no certificate at all.
    let mut after = connect(proxy.addr(), "gatehouse.test", &ca.client(&[])).await;
    assert!(
        after.peer_cert() == renewed.der,
        "new connections get the new certificate"
    );
    let (status, _) = within("GET after reload", after.get("/")).await;
    assert_eq!(status, 200);
    // The connection made before the reload carries on with what it negotiated.
    let (status, _) = within("GET on the old connection", before.get("/")).await;
    assert_eq!(status, 200);

    // A broken key at renewal time: the reload is refused, naming the file, and the
    // certificate in force stays.
    std::fs::write(&live.key, "not a key\n").expect("break key");
    let (status, body) = proxy.reload().await;
    assert_ne!(status, 200, "{body}");
    assert!(body.contains(&live.key.display().to_string()), "{body}");
    let mut still = connect(proxy.addr(), "gatehouse.test", &ca.client(&[])).await;
    assert!(still.peer_cert() == renewed.der);
    let (status, _) = within("GET after a refused reload", still.get("/")).await;
    assert_eq!(status, 200);
}

#[test]
fn check_names_the_file_of_a_bad_certificate_or_key() {
    let ca = TestCa::new();
    let a = ca.leaf("a", &["a.test"]);
    let b = ca.leaf("b", &["b.test"]);
    let garbage = ca.path("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN NOTHING-----\n").expect("write garbage");
    let missing = ca.path("missing.pem");
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("addr");

    let entry = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "{{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        )
    };
    let cases = [
        (entry(&a.cert, &a.key), None),
        (entry(&missing, &a.key), Some((&missing, "cannot read"))),
        (entry(&garbage, &a.key), Some((&garbage, "no end line"))),
        (entry(&a.key, &a.key), Some((&a.key, "no PEM certificate"))),
        (
            entry(&a.cert, &garbage),
            Some((&garbage, "no PEM private key")),
        ),
        (entry(&a.cert, &b.key), Some((&b.key, "does not belong"))),
        ("[]".to_owned(), None),
    ];
    for (i, (tls, want)) in cases.into_iter().enumerate() {
        let (code, output, path) = gatehouse_check(&tls_config(&tls, upstream));
        match (i, want) {
            (0, _) => assert_eq!(code, Some(0), "a good pair: {output}"),
            (_, Some((file, says))) => {
                assert_eq!(code, Some(1), "{tls}: {output}");
                // The `tls = ...` line of the listener (line 10 of `tls_config`).
                let at = format!("{path}:10:");
                let line = output
                    .lines()
                    .find(|l| l.starts_with(&at))
                    .unwrap_or_else(|| panic!("no {at} diagnostic for {tls}: {output}"));
                assert!(line.contains(&file.display().to_string()), "{line}");
                assert!(line.contains(says), "{line} should say {says:?}");
            }
            (_, None) => {
                assert_eq!(code, Some(1), "an empty list: {output}");
                assert!(output.contains(&format!("{path}:10:")), "{output}");
            }
        }
    }
}

/// A client that accepts any certificate, and sends SNI only when `sni`: for the cases where
/// the server is expected to fall back to its default, the certificate is compared directly.
fn any_name_client(sni: bool) -> Arc<rustls::ClientConfig> {
    let files = gatehouse::upstream::tls::TlsFiles {
        verify: false,
        ..Default::default()
    };
    let tls = gatehouse::upstream::tls::build(&files, &[b"http/1.1"]).expect("a no-verify client");
    let mut config = rustls::ClientConfig::clone(tls.client_config());
    config.enable_sni = sni;
    Arc::new(config)
}

/// A TLS listener requiring (or, with `required = false`, requesting) client certificates
/// signed by `clients`, passing the subject in X-Client-Subject.
fn mtls_config(leaf: &Leaf, clients: &TestCa, required: bool, upstream: SocketAddr) -> String {
    let ca = clients.pem_file();
    let tls = format!(
        "{}\nclient_auth = {{ ca = \"{}\", required = {required}, subject_header = \"X-Client-Subject\" }}",
        leaf.toml(),
        ca.display()
    );
    tls_config(&tls, upstream)
}

/// Sends a request with a forged subject header; `None` when the connection failed or closed
/// without an answer (a refused client certificate shows up here under TLS 1.3).
async fn forged_get(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> Option<Echo> {
    let mut conn = Conn::open(addr, "gatehouse.test", Arc::clone(client))
        .await
        .ok()?;
    let request = "GET / HTTP/1.1\r\nHost: gatehouse.test\r\nX-Client-Subject: CN=forged\r\nConnection: close\r\n\r\n";
    conn.stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    // Gatehouse ends with close_notify; an abrupt end is an error here and means no answer.
    let _ = within("mTLS response", conn.stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (_, body) = text.split_once("\r\n\r\n")?;
    text.starts_with("HTTP/1.1 200").then(|| Echo::parse(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_client_certificate_is_verified_and_its_subject_passed_upstream() {
    let ca = TestCa::new();
    let clients = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&mtls_config(&leaf, &clients, true, upstream.addr())).await;

    let alice = clients.client_leaf("alice", "alice");
    let echo = forged_get(proxy.addr(), &ca.client_with_cert(&alice))
        .await
        .expect("a client with a good certificate is served");
    assert_eq!(
        echo.header_all("x-client-subject"),
        ["CN=alice,O=Gatehouse Tests"],
        "the verified subject, and not the forged one: {}",
        echo.raw
    );

    // No certificate, or one from another CA: no request gets through.
    let stranger = ca.client_leaf("mallory", "mallory");
    for (who, client) in [
        ("no certificate", ca.client(&[])),
        ("another CA", ca.client_with_cert(&stranger)),
    ] {
        assert!(
            forged_get(proxy.addr(), &client).await.is_none(),
            "{who}: served"
        );
    }
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_client_certificate_is_optional_and_a_forged_subject_never_passes() {
    let ca = TestCa::new();
    let clients = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&mtls_config(&leaf, &clients, false, upstream.addr())).await;

    let anonymous = forged_get(proxy.addr(), &ca.client(&[]))
        .await
        .expect("served without a certificate");
    assert!(
        anonymous.header_all("x-client-subject").is_empty(),
        "{}",
        anonymous.raw
    );

    let bob = clients.client_leaf("bob", "bob");
    let known = forged_get(proxy.addr(), &ca.client_with_cert(&bob))
        .await
        .expect("served with a certificate");
    assert_eq!(
        known.header_all("x-client-subject"),
        ["CN=bob,O=Gatehouse Tests"]
    );
}

#[test]
fn check_reports_bad_client_auth() {
    let ca = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let missing = ca.path("missing.pem");
    let cases = [
        (
            format!("client_auth = {{ ca = \"{}\" }}", missing.display()),
            true,
            "cannot read",
        ),
        (
            format!(
                "client_auth = {{ ca = \"{}\", subject_header = \"Host\" }}",
                leaf.cert.display()
            ),
            true,
            "cannot be used here",
        ),
        (
            format!("client_auth = {{ ca = \"{}\" }}", leaf.cert.display()),
            false,
            "needs tls",
        ),
    ];
    for (auth, with_tls, says) in cases {
        let toml = if with_tls {
            tls_config(&format!("{}\n{auth}", leaf.toml()), upstream)
        } else {
            tls_config(&leaf.toml(), upstream).replace(&format!("tls = {}", leaf.toml()), &auth)
        };
        let (code, output, path) = gatehouse_check(&toml);
        assert_eq!(code, Some(1), "{toml}\n{output}");
        let at = if with_tls { 11 } else { 10 };
        let line = output
            .lines()
            .find(|l| l.starts_with(&format!("{path}:{at}:")))
            .unwrap_or_else(|| panic!("no diagnostic on line {at}: {output}"));
        assert!(line.contains(says), "{line} should say {says:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_subject_reaches_the_upstream_from_http2_clients_too() {
    use http_body_util::BodyExt;
    let ca = TestCa::new();
    let clients = TestCa::new();
    let leaf = ca.leaf("site", &["gatehouse.test"]);
    let upstream = HttpUpstream::echo().await;
    let proxy = Proxy::start_toml(&mtls_config(&leaf, &clients, true, upstream.addr())).await;

    let carol = clients.client_leaf("carol", "carol");
    let mut config = rustls::ClientConfig::clone(&ca.client_with_cert(&carol));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let conn = connect(proxy.addr(), "gatehouse.test", &Arc::new(config)).await;
    assert_eq!(conn.session().alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, driver) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                conn.stream,
            ))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(driver);
    let request = http::Request::get("https://gatehouse.test/h2")
        .header("x-client-subject", "CN=forged")
        .body(http_body_util::Empty::new())
        .expect("request");
    let resp = within("HTTP/2 request", send.send_request(request))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echo = Echo::parse(std::str::from_utf8(&body).expect("utf-8"));
    assert_eq!(
        echo.header_all("x-client-subject"),
        ["CN=carol,O=Gatehouse Tests"],
        "{}",
        echo.raw
    );
}
