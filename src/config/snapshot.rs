//! The compiled, validated configuration that a request reads.
//!
//! `compile.rs` turns the file form (`file.rs`) into these types; nothing here knows about serde or
//! TOML. Every default and every global/upstream/route override has already been resolved, so the
//! request path reads plain fields and never falls back through layers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::balance::SmoothWeighted;
use crate::metrics::{RouteMetrics, UpstreamMetrics};
use crate::router::Router;
use crate::upstream::pool::ServerIdle;

/// Everything one request needs, swapped atomically on reload (`ArcSwap<Snapshot>`).
#[derive(Debug)]
pub struct Snapshot {
    /// `workers` from the file; `None` means one per core.
    pub workers: Option<usize>,
    pub log: LogSettings,
    pub admin: Option<AdminSettings>,
    pub listeners: Vec<ListenerSettings>,
    /// Upstreams by index; routes refer to them by `UpstreamId`.
    pub upstreams: Vec<Arc<Upstream>>,
    pub routes: Vec<Arc<Route>>,
    pub router: Router,
    pub limits: ConnLimits,
    pub timeouts: ConnTimeouts,
}

impl Snapshot {
    pub fn upstream(&self, id: UpstreamId) -> &Arc<Upstream> {
        &self.upstreams[id.0]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub access: AccessTarget,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    Off,
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    pub name: String,
    pub listen: SocketAddr,
    /// Most client connections this listener holds at once; accepting pauses at the cap.
    pub max_connections: usize,
}

/// Per-connection limits: they apply before a route is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Request line plus header fields, in bytes; over it: 431.
    pub max_header_bytes: usize,
    /// Header field count; over it: 431.
    pub max_headers: usize,
    /// Request-target length in bytes; over it: 414.
    pub max_uri_bytes: usize,
}

/// Per-connection timeouts on the client side, and the shutdown grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// From the first byte of a request (or the connection's start) to its last header byte.
    pub client_header: Duration,
    /// Idle keep-alive time between two requests.
    pub client_idle: Duration,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub usize);

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Vec<Server>,
    pub balancer: SmoothWeighted,
    pub timeouts: UpstreamTimeouts,
    /// Idle connections kept per server (nginx's `keepalive`).
    pub max_idle_per_server: usize,
    /// Shared with the metrics registry, so counts survive a reload of the same upstream name.
    pub metrics: Arc<UpstreamMetrics>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub address: SocketAddr,
    pub weight: u32,
    /// Stable across reloads (upstream name + address), so the pool keeps idle connections warm.
    pub key: Arc<str>,
    /// This server's idle connections, looked up by `key` on first use and then held here, so
    /// a request reaches them without a map lookup. Empty in a freshly compiled snapshot.
    pub idle: OnceLock<Arc<ServerIdle>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// From the end of the request to the end of the response head.
    pub response_header: Duration,
    /// Longest gap between two reads of the response body.
    pub read: Duration,
    /// Longest gap between two writes of the request body to the upstream.
    pub write: Duration,
    /// How long an unused pooled connection is kept.
    pub idle: Duration,
}

#[derive(Debug)]
pub struct Route {
    /// The route's `name`, or `route<N>` from its position in the file; a metric label.
    pub name: Arc<str>,
    pub host: Option<HostMatch>,
    /// Shared by every route with the same path (most configs repeat a few, such as `/`).
    pub path: Arc<str>,
    pub action: RouteAction,
    /// Largest request body accepted; over it: 413.
    pub max_body_bytes: u64,
    /// Longest gap between two reads of the request body from the client.
    pub client_body_timeout: Duration,
    /// Resolved from the route's upstream, with the route's own overrides applied.
    pub upstream_timeouts: Option<UpstreamTimeouts>,
    pub access_log: bool,
    /// Shared with the metrics registry, so counts survive a reload of the same route name.
    pub metrics: Arc<RouteMetrics>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-cased, without a port.
    Exact(Box<str>),
    /// `*.example.com` stored as `.example.com`: matches any name ending with it.
    Suffix(Box<str>),
}

impl HostMatch {
    /// The stored name: the exact host, or the suffix with its leading dot.
    pub fn as_str(&self) -> &str {
        match self {
            HostMatch::Exact(s) | HostMatch::Suffix(s) => s,
        }
    }
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    Proxy(UpstreamId),
    /// Boxed: it is the rare, large variant, and a route with many siblings should stay small.
    Respond(Box<FixedResponse>),
}

#[derive(Debug, Clone)]
pub struct FixedResponse {
    pub status: u16,
    pub body: bytes::Bytes,
    pub content_type: String,
}
