//! The admin API: `GET /health` and `GET /metrics`, served with axum on its own listener.
//!
//! Neighbours: `app.rs` binds the admin address and runs `serve` beside the proxy listeners; the
//! handlers only read shared state (`metrics.rs` for the counters), so nothing here is on the
//! request path of proxied traffic.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The Prometheus text exposition format this API speaks, as scrapers expect to see it.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin handlers can read. Cheap to clone: axum clones it per request.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
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
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
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
        let task = tokio::spawn(serve(listener, AdminState { metrics }, token.clone()));
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
