//! The admin API, served with axum on its own listener: `GET /health`, `GET /metrics`,
//! `GET /upstreams`, `GET /config`, `POST /reload` and `POST /drain`.
//!
//! Neighbours: `app.rs` binds the admin address and runs `serve` beside the proxy listeners; the
//! handlers only read shared state (`metrics.rs` for the counters, the config in force and its
//! servers' live state for `/upstreams`), so nothing here is on the request path of proxied
//! traffic.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::balance::Algorithm;
use crate::reload::{ReloadError, Reloader};
use crate::upstream::state;

/// The Prometheus text exposition format this API speaks, as scrapers expect to see it.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin handlers can read. Cheap to clone: axum clones it per request.
#[derive(Clone)]
pub struct AdminState {
    pub shared: Arc<Shared>,
    /// `None` when nothing can be reloaded (a process started without a config file).
    pub reloader: Option<Arc<Reloader>>,
}

/// Serves the admin API on an already-bound listener until `shutdown` is cancelled.
///
/// After cancellation, no new connections are accepted and idle ones are closed; the call returns
/// once in-flight requests have finished.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/upstreams", get(upstreams))
        .route("/config", get(config))
        .route("/reload", post(reload))
        .route("/drain", post(drain))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = state.shared.metrics.render();
    crate::metrics::render_servers(&mut text, &state.shared.config.load_full());
    if let Some(reloader) = &state.reloader {
        crate::metrics::render_reloads(&mut text, &reloader.status());
    }
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response()
}

/// `POST /reload`: read the config file again; 200 with what changed, or 400 with every problem
/// (`file:line:col: message`) and the old config still in force.
async fn reload(State(state): State<AdminState>) -> Response {
    let Some(reloader) = &state.reloader else {
        return (
            StatusCode::CONFLICT,
            Json(ErrorBody {
                error: "this process has no config file to reload",
            }),
        )
            .into_response();
    };
    match reloader.reload().await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(e) => {
            let status = match e {
                ReloadError::Config(_) => StatusCode::BAD_REQUEST,
                ReloadError::Bind { .. }
                | ReloadError::NoFile
                | ReloadError::HandedOff
                | ReloadError::HandoffInProgress => StatusCode::CONFLICT,
            };
            let body = ReloadFailed {
                error: "the config was not reloaded; the previous one stays in force",
                problems: e.to_string().lines().map(str::to_owned).collect(),
            };
            (status, Json(body)).into_response()
        }
    }
}

#[derive(Serialize)]
struct ReloadFailed {
    error: &'static str,
    problems: Vec<String>,
}

/// `GET /config`: the config in force, when it was loaded, and how the last reloads went.
async fn config(State(state): State<AdminState>) -> Response {
    let Some(reloader) = &state.reloader else {
        return not_found().await;
    };
    let s = reloader.status();
    let unix_ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
    };
    Json(ConfigView {
        path: s.path.as_ref().map(|p| p.display().to_string()),
        generation: s.generation,
        loaded_at_unix_ms: unix_ms(s.loaded_at),
        reloads_ok: s.reloads_ok,
        reloads_failed: s.reloads_failed,
        last_error: s.last_error.as_ref().map(|(at, e)| LastError {
            at_unix_ms: unix_ms(*at),
            problems: e.lines().map(str::to_owned).collect(),
        }),
        text: s.text.to_string(),
    })
    .into_response()
}

#[derive(Serialize)]
struct ConfigView {
    path: Option<String>,
    generation: u64,
    loaded_at_unix_ms: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    last_error: Option<LastError>,
    text: String,
}

#[derive(Serialize)]
struct LastError {
    at_unix_ms: u64,
    problems: Vec<String>,
}

/// `POST /drain`: what SIGTERM does, for taking a node out of a pool: stop accepting, finish
/// what is in flight (responses say `Connection: close`), close idle connections a moment later
/// (`app::IDLE_CLOSE_AFTER`), exit.
async fn drain(State(state): State<AdminState>) -> Response {
    tracing::info!("POST /drain: draining");
    state.shared.start_drain();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "draining"})),
    )
        .into_response()
}

/// `GET /upstreams`: every server of every upstream as the balancer sees it now.
async fn upstreams(State(state): State<AdminState>) -> Json<UpstreamsView> {
    let snapshot = state.shared.config.load_full();
    let now_ms = state::now_ms();
    let now_ns = state::now_ns();
    let upstreams = snapshot
        .upstreams
        .iter()
        .map(|u| {
            let targets = u.targets.load_full();
            let servers = targets
                .servers
                .iter()
                .map(|s| {
                    let st = &s.state;
                    ServerView {
                        address: s.address.to_string(),
                        weight: s.weight,
                        backup: s.backup,
                        state: st.condition(now_ms, s.drain).as_str(),
                        healthy_by_checks: st.is_up(),
                        ejected_for_ms: st.ejected_for(now_ms),
                        weight_factor: st.weight_factor(now_ms, u.balance.slow_start),
                        in_flight: st.in_flight(),
                        max_conns: (s.max_conns != u32::MAX).then_some(s.max_conns),
                        latency_ewma_ms: st
                            .ewma
                            .has_samples()
                            .then(|| st.ewma.estimate(now_ns) * 1000.0),
                        requests: st.requests_total(),
                        failures: st.failures_total(),
                        consecutive_failures: st.consecutive_failures(),
                        ejections: st.ejections_total(),
                        recent_failures: st
                            .recent_failures()
                            .into_iter()
                            .map(|f| FailureView {
                                unix_ms: f
                                    .at
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
                                what: f.what,
                            })
                            .collect(),
                    }
                })
                .collect();
            UpstreamView {
                name: u.name.clone(),
                balance: algorithm_name(&u.balance.algorithm),
                health_check: u.health_check.is_some(),
                pending: u.live.pending.load(std::sync::atomic::Ordering::Relaxed),
                servers,
            }
        })
        .collect();
    Json(UpstreamsView { upstreams })
}

fn algorithm_name(a: &Algorithm) -> &'static str {
    match a {
        Algorithm::RoundRobin => "round_robin",
        Algorithm::Random => "random",
        Algorithm::LeastRequests => "least_requests",
        Algorithm::PeakEwma => "peak_ewma",
        Algorithm::ConsistentHash(_) => "consistent_hash",
    }
}

#[derive(Serialize)]
struct UpstreamsView {
    upstreams: Vec<UpstreamView>,
}

#[derive(Serialize)]
struct UpstreamView {
    name: String,
    balance: &'static str,
    health_check: bool,
    /// Requests waiting for a server under its `max_conns`.
    pending: u32,
    servers: Vec<ServerView>,
}

#[derive(Serialize)]
struct ServerView {
    address: String,
    weight: u32,
    backup: bool,
    /// healthy, unhealthy, ejected or draining.
    state: &'static str,
    healthy_by_checks: bool,
    ejected_for_ms: Option<u64>,
    /// The share of its weight the server gets while it ramps up after a recovery.
    weight_factor: f64,
    in_flight: u32,
    max_conns: Option<u32>,
    latency_ewma_ms: Option<f64>,
    requests: u64,
    failures: u64,
    consecutive_failures: u32,
    ejections: u64,
    recent_failures: Vec<FailureView>,
}

#[derive(Serialize)]
struct FailureView {
    unix_ms: u64,
    what: &'static str,
}

#[derive(Serialize)]
struct ErrorBody {
    error: &'static str,
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody { error: "not found" }),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: "method not allowed",
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::metrics::Metrics;

    /// Starts the API on port 0 and returns its address, the shutdown token and the server task.
    async fn spawn(
        metrics: Arc<Metrics>,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let config =
            "[log]\naccess = false\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n";
        let snapshot = crate::config::load_str(std::path::Path::new("t.toml"), config, &metrics)
            .expect("a minimal config compiles");
        let shared = Arc::new(Shared::new(
            snapshot,
            metrics,
            crate::access_log::AccessLog::default(),
        ));
        let state = AdminState {
            shared,
            reloader: None,
        };
        let task = tokio::spawn(serve(listener, state, token.clone()));
        (addr, token, task)
    }

    /// One raw HTTP/1.1 exchange; returns the head (lower-cased) and the body.
    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn health_and_not_found() {
        let (addr, token, task) = spawn(Arc::default()).await;

        let (head, body) = request(addr, "GET", "/health").await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
        );

        let (head, body) = request(addr, "GET", "/nope").await;
        assert!(head.starts_with("http/1.1 404 not found\r\n"), "{head}");
        assert_eq!(body, r#"{"error":"not found"}"#);

        let (head, _) = request(addr, "POST", "/health").await;
        assert!(
            head.starts_with("http/1.1 405 method not allowed\r\n"),
            "{head}"
        );

        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn metrics_are_rendered() {
        let metrics = Arc::new(Metrics::default());
        metrics.route("api").record(204);
        let (addr, token, task) = spawn(Arc::clone(&metrics)).await;

        let (head, body) = request(addr, "GET", "/metrics").await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(
            body.contains("gatehouse_requests_total{route=\"api\",class=\"2xx\"} 1\n"),
            "{body}"
        );

        token.cancel();
        task.await.unwrap().unwrap();
    }
}
