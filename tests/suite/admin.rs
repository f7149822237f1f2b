//! The admin API (`/health`, `/metrics`) and the access log.

use std::time::Duration;

use crate::support::proxy::metric_value;
use crate::support::raw::RawConn;
use crate::support::{client, closed_port, poll_until, upstream_toml, HttpUpstream, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ok_and_version() {
    let proxy = Proxy::start("").await;
    let (status, body) = proxy.admin_get("/health").await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health is not JSON ({e}): {body}"));
    assert_eq!(
        value,
        serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })
    );
}

/// Polls `/metrics` until `series` reaches `want` (counters are bumped as a response ends, which
/// may be a moment after the client has read it), then checks it is exactly `want`.
async fn assert_metric(proxy: &Proxy, series: &str, want: f64) {
    let _ = poll_until(Duration::from_secs(5), || async {
        metric_value(&proxy.metrics().await, series).filter(|v| *v >= want)
    })
    .await;
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(&text, series),
        Some(want),
        "{series} in /metrics:\n{text}"
    );
}

/// The sum of every sample of `name` (with any labels, or none).
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_class() {
    let up = HttpUpstream::echo().await;
    let proxy = Proxy::start(&format!(
        "{}[[route]]\nname = \"api\"\npath = \"/api/\"\nupstream = \"app\"\n\n\
         [[route]]\nname = \"gone\"\npath = \"/gone/\"\nrespond = {{ status = 404, body = \"gone\\n\" }}\n",
        upstream_toml("app", &[up.addr()])
    ))
    .await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    for i in 0..7 {
        conn.send(format!("GET /api/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        assert_eq!(conn.read_response(false).await.status, 200);
    }
    for i in 0..2 {
        conn.send(format!("GET /gone/{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
            .await;
        assert_eq!(conn.read_response(false).await.status, 404);
    }
    assert_metric(
        &proxy,
        r#"gatehouse_requests_total{route="api",class="2xx"}"#,
        7.0,
    )
    .await;
    assert_metric(
        &proxy,
        r#"gatehouse_requests_total{route="gone",class="4xx"}"#,
        2.0,
    )
    .await;

    let text = proxy.metrics().await;
    for name in [
        "gatehouse_request_duration_seconds_bucket",
        "gatehouse_client_connections_active",
        "gatehouse_upstream_connections_opened_total",
        "gatehouse_upstream_connections_reused_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // Every proxied request either opened a connection or reused one.
    let opened = metric_value(
        &text,
        r#"gatehouse_upstream_connections_opened_total{upstream="app"}"#,
    );
    let reused = metric_value(
        &text,
        r#"gatehouse_upstream_connections_reused_total{upstream="app"}"#,
    );
    assert_eq!(
        opened,
        Some(up.connections() as f64),
        "opened connections vs. accepts at the upstream:\n{text}"
    );
    assert_eq!(
        opened.zip(reused).map(|(o, r)| o + r),
        Some(7.0),
        "opened + reused over 7 proxied requests:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_refused_connects() {
    let proxy = Proxy::start(&format!(
        "{}[[route]]\nname = \"api\"\npath = \"/\"\nupstream = \"app\"\n",
        upstream_toml("app", &[closed_port()])
    ))
    .await;
    let resp = client()
        .get(proxy.url("/x"))
        .send()
        .await
        .expect("GET through the proxy");
    assert_eq!(resp.status().as_u16(), 502);
    let series = r#"gatehouse_upstream_errors_total{upstream="app",kind="connect_refused"}"#;
    let counted = poll_until(Duration::from_secs(5), || async {
        metric_value(&proxy.metrics().await, series).filter(|v| *v >= 1.0)
    })
    .await;
    assert!(counted.is_some(), "{series}:\n{}", proxy.metrics().await);
    assert_metric(
        &proxy,
        r#"gatehouse_requests_total{route="api",class="5xx"}"#,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_client_connections_gauge_follows_connections() {
    let proxy =
        Proxy::start("[[route]]\npath = \"/\"\nrespond = { status = 200, body = \"hi\\n\" }\n")
            .await;
    let name = "gatehouse_client_connections_active";
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(conn.read_response(false).await.status, 200);
    let open = poll_until(Duration::from_secs(5), || async {
        metric_sum(&proxy.metrics().await, name).filter(|v| *v == 1.0)
    })
    .await;
    assert!(
        open.is_some(),
        "{name} with one open client connection:\n{}",
        proxy.metrics().await
    );
    drop(conn);
    let closed = poll_until(Duration::from_secs(5), || async {
        metric_sum(&proxy.metrics().await, name).filter(|v| *v == 0.0)
    })
    .await;
    assert!(
        closed.is_some(),
        "{name} after the client connection closed:\n{}",
        proxy.metrics().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request() {
    let up = HttpUpstream::echo().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("access.log");
    let toml = format!(
        r#"[log]
access = "{log}"
format = "json"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
http2 = true

{upstream}[[route]]
name = "api"
path = "/api/"
upstream = "app"
"#,
        log = log_path.display(),
        upstream = upstream_toml("app", &[up.addr()]),
    );
    let proxy = Proxy::start_toml(&toml).await;
    let http = client();
    let r1 = http
        .get(proxy.url("/api/one?q=1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r1.status().as_u16(), 200);
    let r2 = http
        .post(proxy.url("/api/two"))
        .body("hello")
        .send()
        .await
        .expect("POST");
    assert_eq!(r2.status().as_u16(), 200);
    let r3 = http.get(proxy.url("/nowhere")).send().await.expect("GET");
    assert_eq!(r3.status().as_u16(), 404);
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client");
    let r4 = h2
        .get(proxy.url("/api/h2"))
        .send()
        .await
        .expect("GET over h2c");
    assert_eq!(r4.status().as_u16(), 200);

    let lines = poll_until(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= 4).then_some(lines)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the access log did not get 4 lines: {:?}",
            std::fs::read_to_string(&log_path)
        )
    });
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |target: &str| {
        entries
            .iter()
            .find(|e| e["target"] == target)
            .unwrap_or_else(|| panic!("no line for {target}: {lines:#?}"))
    };
    let upstream = up.addr().to_string();
    let one = find("/api/one?q=1");
    assert_eq!(one["method"], "GET");
    assert_eq!(one["protocol"], "HTTP/1.1");
    assert_eq!(one["status"], 200);
    assert_eq!(one["upstream"], upstream.as_str());
    let two = find("/api/two");
    assert_eq!(two["method"], "POST");
    assert_eq!(two["status"], 200);
    assert_eq!(two["upstream"], upstream.as_str());
    let nowhere = find("/nowhere");
    assert_eq!(nowhere["method"], "GET");
    assert_eq!(nowhere["status"], 404);
    assert!(nowhere["upstream"].is_null(), "{nowhere}");
    let over_h2 = find("/api/h2");
    assert_eq!(over_h2["protocol"], "HTTP/2.0", "{over_h2}");
    assert_eq!(over_h2["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_access_logged() {
    // A request refused before it was parsed (here a smuggling shape) still leaves a line, as
    // nginx logs its 400s: it is what an operator looks for when a client misbehaves.
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("access.log");
    let toml = format!(
        r#"[log]
access = "{log}"
format = "json"

[[listener]]
name = "web"
listen = "127.0.0.1:0"

[[route]]
path = "/"
respond = {{ status = 200 }}
"#,
        log = log_path.display(),
    );
    let proxy = Proxy::start_toml(&toml).await;
    let exchange = crate::support::raw::send(
        proxy.addr(),
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    assert_eq!(exchange.status(), Some(400), "{}", exchange.text());
    let line = poll_until(Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        text.lines().next().map(str::to_owned)
    })
    .await
    .expect("no access log line for the refused request");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(entry["status"], 400, "{line}");
    assert!(entry["upstream"].is_null(), "{line}");
}
