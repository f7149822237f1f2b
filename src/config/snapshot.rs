//! The compiled, validated configuration that a request reads.
//!
//! `compile.rs` turns the file form (`file.rs`) into these types; nothing here knows about serde or
//! TOML. Every default and every global/upstream/route override has already been resolved, so the
//! request path reads plain fields and never falls back through layers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balance::Algorithm;
use crate::metrics::{RouteMetrics, UpstreamMetrics};
use crate::router::Router;
pub use crate::upstream::state::OutlierSettings;
pub use crate::upstream::targets::{Server, Targets, UpstreamLive};

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
    pub resolver: ResolverSettings,
    /// `[reload] watch`: how often to look at the file for changes; `None`: only on a signal or
    /// `POST /reload`.
    pub watch: Option<Duration>,
    pub http2: Http2Settings,
}

/// `[http2]`, resolved: what every HTTP/2 client connection is held to (`http2::server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS we announce.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: the decoded size of one header block (HPACK bombs and
    /// CONTINUATION floods stop here).
    pub max_header_list_size: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    /// Streams reset by the client before we accepted them (h2's own Rapid Reset guard).
    pub max_pending_resets: usize,
    /// Client resets on one connection past which, when they are also more than half of its
    /// streams, it is closed (Rapid Reset, CVE-2023-44487).
    pub max_client_resets: u64,
    /// Resets we are made to send for the client's protocol errors (MadeYouReset,
    /// CVE-2025-8671).
    pub max_local_error_resets: usize,
    /// PING, SETTINGS and PRIORITY frames allowed in any 10-second window.
    pub max_control_frames: u32,
    /// Longest wait for the client to take more response bytes (a zero window).
    pub send_timeout: Duration,
}

/// How server names are resolved (`[resolver]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Empty: the system's configuration.
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
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
    /// TLS termination, when the listener has `tls`.
    pub tls: Option<TlsSettings>,
    /// HTTP/2: in ALPN on a TLS listener; with prior knowledge (h2c) on a plain one.
    pub http2: bool,
}

/// A listener's TLS: the rustls config, and with client certificates, the request header that
/// carries the verified subject upstream. Two are equal only when they are the same one.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub config: Arc<rustls::ServerConfig>,
    pub subject_header: Option<Arc<str>>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.subject_header == other.subject_header
    }
}

impl Eq for TlsSettings {}

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
    /// The servers as configured; names among them are resolved by `upstream::resolve`.
    pub specs: Vec<ServerSpec>,
    /// The servers requests go to now, with the balancers built for them. Swapped whole when DNS
    /// re-resolution changes the addresses; a request loads it once.
    pub targets: ArcSwap<Targets>,
    pub balance: BalanceSettings,
    pub health_check: Option<HealthCheckSettings>,
    pub outlier: OutlierSettings,
    pub retry: RetrySettings,
    pub queue: QueueSettings,
    pub timeouts: UpstreamTimeouts,
    /// Idle connections kept per server (nginx's `keepalive`).
    pub max_idle_per_server: usize,
    /// Connect to the servers over TLS, with this client.
    pub tls: Option<Arc<crate::upstream::tls::UpstreamTls>>,
    /// What the upstream's servers speak.
    pub protocol: UpstreamProtocol,
    /// Shared with the metrics registry, so counts survive a reload of the same upstream name.
    pub metrics: Arc<UpstreamMetrics>,
    /// What requests to this upstream share while they run: the wait queue, the retry budget.
    pub live: UpstreamLive,
}

impl Upstream {
    /// Whether any server is given by name, so that a resolver task must keep it current.
    pub fn needs_resolver(&self) -> bool {
        self.specs
            .iter()
            .any(|s| matches!(s.host, ServerHost::Name { .. }))
    }
}

/// The protocol spoken to an upstream's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 over cleartext TCP, with prior knowledge (RFC 9113 §3.3).
    H2c,
    /// HTTP/2 over TLS, negotiated by ALPN.
    H2,
}

impl UpstreamProtocol {
    /// Requests go out as HTTP/2 streams on shared connections (`http2::client`).
    pub fn is_http2(self) -> bool {
        matches!(self, UpstreamProtocol::H2c | UpstreamProtocol::H2)
    }
}

/// One entry of `servers`, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub host: ServerHost,
    pub weight: u32,
    /// Used only when no primary server is available.
    pub backup: bool,
    /// Takes no new requests (sticky sessions aside); finishes what it has.
    pub drain: bool,
    /// Most requests in flight to this server at once; 0: no limit.
    pub max_conns: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerHost {
    Addr(SocketAddr),
    /// A DNS name, resolved at start and again when its records' TTL runs out.
    Name {
        host: String,
        port: u16,
    },
}

/// How an upstream spreads requests over its servers.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSettings {
    pub algorithm: Algorithm,
    /// Sticky sessions: the cookie that pins a client to the server that first answered it.
    pub sticky_cookie: Option<Box<str>>,
    /// How long a recovered server takes to get its full weight back; zero: at once.
    pub slow_start: Duration,
    /// Below this share (0.0-1.0) of primaries available, health is ignored and every primary
    /// takes requests (Envoy's panic threshold). 0: only when none is left.
    pub panic_threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down server back.
    pub rise: u32,
    /// Consecutive failures that take a server down.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// A TCP connect that succeeds within the timeout.
    Tcp,
    /// `GET path` with `Host: host`; healthy when the status is in `expect`.
    Http {
        path: String,
        /// `None`: the server's address.
        host: Option<String>,
        expect: StatusSet,
    },
}

/// A set of status codes given as inclusive ranges, such as 200-399.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(pub Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

/// When a failed try is tried again on another server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Most tries per request, the first included.
    pub attempts: u32,
    /// Longest wait for a response head on one try; on expiry an idempotent request moves on to
    /// another server. `None`: the `response_header` timeout applies, and a timeout is final.
    pub per_try_timeout: Option<Duration>,
    /// Retries may add at most this share (0.0-1.0) of extra load...
    pub budget_ratio: f64,
    /// ...but this many retries per second are always allowed, so a quiet upstream can retry.
    pub budget_min_per_second: u32,
}

/// What happens when every server is at its `max_conns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Requests that may wait for a free server; over it: 503 at once.
    pub max_pending: u32,
    /// How long one may wait; then: 503.
    pub timeout: Duration,
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
    /// Longest silence, both ways, on a connection that switched protocols (WebSocket).
    pub tunnel_idle: Duration,
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
    /// A request whose body was already sent may be tried again on another server (the route's
    /// owner says that is safe); its body is then held in memory until the response comes.
    pub retry_with_body: bool,
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
