//! Gatehouse started in-process from a config written to a temp file.

use std::net::SocketAddr;
use std::time::Duration;

use gatehouse::app::Gatehouse;
use tempfile::NamedTempFile;

/// What every test config starts with: no access log, an admin API and one listener named `web`,
/// all on port 0. The caller appends tables (`[timeouts]`, `[upstream.x]`, `[[route]]`, ...);
/// top-level keys cannot be appended because they would land in the `[[listener]]` table.
pub const BASE_CONFIG: &str = r#"[log]
access = false

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"

"#;

/// A running Gatehouse. Dropping it begins a shutdown; `stop` also waits for the drain.
pub struct Proxy {
    gatehouse: Option<Gatehouse>,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    /// Kept so the file outlives the proxy (a reload would read it again).
    config: NamedTempFile,
}

impl Proxy {
    /// Starts Gatehouse with `BASE_CONFIG` followed by `tables`.
    pub async fn start(tables: &str) -> Proxy {
        Proxy::start_toml(&format!("{BASE_CONFIG}{tables}")).await
    }

    /// Starts Gatehouse with exactly `toml`, which must define a listener named `web`.
    pub async fn start_toml(toml: &str) -> Proxy {
        let config = write_config(toml);
        let started = super::within("Gatehouse::start", Gatehouse::start(config.path())).await;
        let gatehouse = match started {
            Ok(g) => g,
            Err(err) => panic!("Gatehouse::start failed: {err}\n--- config ---\n{toml}"),
        };
        let addr = gatehouse
            .listener_addr("web")
            .expect("the config defines a listener named \"web\"");
        let admin = gatehouse.admin_addr();
        Proxy {
            gatehouse: Some(gatehouse),
            addr,
            admin,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}` on the `web` listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("the config has an [admin] section")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr(), path)
    }

    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.gatehouse.as_ref().and_then(|g| g.listener_addr(name))
    }

    /// The config file Gatehouse was started from (and reloads).
    pub fn config_path(&self) -> &std::path::Path {
        self.config.path()
    }

    /// Replaces the config file with `BASE_CONFIG` followed by `tables`; `reload` puts it in force.
    pub fn rewrite(&self, tables: &str) {
        self.rewrite_toml(&format!("{BASE_CONFIG}{tables}"));
    }

    /// Replaces the config file with exactly `toml`.
    pub fn rewrite_toml(&self, toml: &str) {
        std::fs::write(self.config.path(), toml).expect("rewriting the config file");
    }

    /// `POST /reload` on the admin API; returns (status, body).
    pub async fn reload(&self) -> (u16, String) {
        let resp = super::client()
            .post(self.admin_url("/reload"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /reload: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("reload body"))
    }

    /// Begins a graceful shutdown without waiting for it.
    pub fn shutdown(&self) {
        if let Some(g) = &self.gatehouse {
            g.shutdown();
        }
    }

    /// Resolves when Gatehouse has finished draining; fails the test after `limit`.
    pub async fn wait(mut self, limit: Duration) {
        if let Some(g) = self.gatehouse.take() {
            super::within_for(limit, "Gatehouse::wait after shutdown", g.wait()).await;
        }
    }

    /// Shuts down and waits for the drain to finish.
    pub async fn stop(self) {
        self.shutdown();
        self.wait(Duration::from_secs(30)).await;
    }

    /// GET `path` on the admin API and return (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = super::client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET admin {path}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("admin body");
        (status, body)
    }

    /// The current `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(g) = &self.gatehouse {
            g.shutdown();
        }
    }
}

/// Writes `toml` to a fresh `*.toml` temp file.
pub fn write_config(toml: &str) -> NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("gatehouse-test-")
        .suffix(".toml")
        .tempfile()
        .expect("creating a temp config file");
    std::fs::write(file.path(), toml).expect("writing the temp config file");
    file
}

/// Finds the value of the Prometheus sample whose name-and-labels part is exactly `series`
/// (for example `gatehouse_requests_total{route="api",class="2xx"}`).
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        // The series must end here: `foo_total` must not match `foo_total_bar`.
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
