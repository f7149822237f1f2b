//! Every metric Gatehouse exports, as lock-free counters, and their Prometheus text rendering.
//!
//! Neighbours: `proxy.rs` and `upstream/pool.rs` bump these on the request path (one relaxed atomic
//! add each); `conn.rs` moves the connection gauge; `access_log.rs` counts the lines it had to drop;
//! `admin.rs` renders them all on `GET /metrics`. Metric names are constants here so that a rename
//! is one edit and a dashboard can grep for them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::snapshot::{Snapshot, Targets, Upstream};
use crate::upstream::state::{self, Condition, ServerState};

pub const REQUESTS_TOTAL: &str = "gatehouse_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "gatehouse_request_duration_seconds";
pub const CLIENT_CONNECTIONS_ACTIVE: &str = "gatehouse_client_connections_active";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "gatehouse_client_connections_total";
pub const UPSTREAM_CONNECTIONS_OPENED_TOTAL: &str = "gatehouse_upstream_connections_opened_total";
pub const UPSTREAM_CONNECTIONS_REUSED_TOTAL: &str = "gatehouse_upstream_connections_reused_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "gatehouse_upstream_errors_total";
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "gatehouse_access_log_dropped_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "gatehouse_tls_handshake_failures_total";
pub const HTTP2_CONNECTIONS_TOTAL: &str = "gatehouse_http2_connections_total";
pub const HTTP2_STREAMS_TOTAL: &str = "gatehouse_http2_streams_total";
pub const HTTP2_ABUSE_TOTAL: &str = "gatehouse_http2_abuse_total";
pub const UPSTREAM_RETRIES_TOTAL: &str = "gatehouse_upstream_retries_total";
pub const UPSTREAM_RETRIES_REFUSED_TOTAL: &str = "gatehouse_upstream_retries_refused_total";
pub const UPSTREAM_QUEUED_TOTAL: &str = "gatehouse_upstream_queued_total";
pub const UPSTREAM_SATURATED_TOTAL: &str = "gatehouse_upstream_saturated_total";
pub const UPSTREAM_PENDING: &str = "gatehouse_upstream_pending";
pub const CONFIG_RELOADS_TOTAL: &str = "gatehouse_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "gatehouse_config_last_reload_successful";
pub const CONFIG_LOADED_TIMESTAMP_SECONDS: &str = "gatehouse_config_loaded_timestamp_seconds";
pub const CONFIG_GENERATION: &str = "gatehouse_config_generation";
pub const SERVER_STATE: &str = "gatehouse_upstream_server_state";
pub const SERVER_IN_FLIGHT: &str = "gatehouse_upstream_server_in_flight";
pub const SERVER_LATENCY_EWMA_SECONDS: &str = "gatehouse_upstream_server_latency_ewma_seconds";
pub const SERVER_REQUESTS_TOTAL: &str = "gatehouse_upstream_server_requests_total";
pub const SERVER_FAILURES_TOTAL: &str = "gatehouse_upstream_server_failures_total";
pub const SERVER_EJECTIONS_TOTAL: &str = "gatehouse_upstream_server_ejections_total";

/// Upper bounds of the request-duration histogram, in nanoseconds and as rendered in `le`. Kept as
/// text too so that the exposition shows `0.0005`, not whatever a float formatter picks.
const DURATION_BUCKETS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

/// Status class labels, indexed like `RouteMetrics::by_class`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counts for one route, by status class (1xx..5xx).
#[derive(Debug, Default)]
pub struct RouteMetrics {
    pub by_class: [AtomicU64; 5],
}

impl RouteMetrics {
    pub fn record(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// Why an exchange with an upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    ConnectRefused,
    ConnectTimeout,
    Connect,
    Reset,
    Timeout,
    BadResponse,
    ClosedEarly,
    /// The TLS handshake with the server failed: a certificate that did not verify, a server
    /// that does not speak TLS on that port, no protocol in common.
    Tls,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 8] = [
        UpstreamErrorKind::ConnectRefused,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::BadResponse,
        UpstreamErrorKind::ClosedEarly,
        UpstreamErrorKind::Tls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::ConnectRefused => "connect_refused",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::BadResponse => "bad_response",
            UpstreamErrorKind::ClosedEarly => "closed_early",
            UpstreamErrorKind::Tls => "tls",
        }
    }
}

/// Counts for one upstream.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    pub connections_opened: AtomicU64,
    pub connections_reused: AtomicU64,
    pub errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    /// Tries after the first, on another server.
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub retries_refused: AtomicU64,
    /// Requests answered 503 because every server was at its `max_conns` and the queue was full
    /// or the wait ran out.
    pub saturated: AtomicU64,
    /// Requests that waited in the queue for a server.
    pub queued: AtomicU64,
}

impl UpstreamMetrics {
    pub fn error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Picks one counter out of an upstream's, so a table of them can be rendered in one loop.
type CounterOf = fn(&UpstreamMetrics) -> &AtomicU64;

/// A fixed-bucket histogram of request durations. Buckets hold per-bucket (not cumulative) counts
/// so that an observation is a single add; `render` accumulates them.
#[derive(Debug, Default)]
struct DurationHistogram {
    /// One slot per bound in `DURATION_BUCKETS`, plus the last for anything above the largest.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl DurationHistogram {
    fn observe(&self, d: Duration) {
        // Compare in nanoseconds: at microsecond resolution 500.4µs would land in le="0.0005".
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let slot = DURATION_BUCKETS.partition_point(|&(bound, _)| bound < nanos);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The registry: one per running Gatehouse, shared by every snapshot it loads.
#[derive(Debug, Default)]
pub struct Metrics {
    // The registries are locked only while a config is compiled and while `/metrics` renders;
    // requests hold the `Arc`s handed out, so the request path never sees these locks.
    // Routes are keyed by the route's own `Arc<str>` name, so a config with a million routes adds
    // no second copy of each name; `render` sorts them.
    routes: Mutex<HashMap<Arc<str>, Arc<RouteMetrics>, foldhash::fast::RandomState>>,
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamMetrics>>>,
    /// Each server's live state by its stable key (`upstream/address`): not a metric itself, but
    /// kept here for the same reason as the counters, so that it survives a rebuilt server list.
    servers: Mutex<HashMap<Arc<str>, Arc<ServerState>, foldhash::fast::RandomState>>,
    request_duration: DurationHistogram,
    client_connections_active: AtomicI64,
    client_connections_total: AtomicU64,
    /// Access-log entries dropped because the writer thread fell behind.
    pub access_log_dropped: AtomicU64,
    tls_handshake_failures: AtomicU64,
    http2_connections: AtomicU64,
    http2_streams: AtomicU64,
    /// HTTP/2 connections closed with ENHANCE_YOUR_CALM, by `Abuse` kind.
    http2_abuse: [AtomicU64; Abuse::ALL.len()],
}

/// Why an HTTP/2 client connection was closed as abusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abuse {
    /// Rapid Reset: more streams reset by the client than the limit allows.
    Resets,
    /// PING, SETTINGS or PRIORITY frames beyond the limit.
    ControlFrames,
    /// A response the client would not read (zero window) past the send timeout.
    SendTimeout,
    /// h2's own guards: pending resets, local error resets, CONTINUATION, small DATA frames.
    Protocol,
}

impl Abuse {
    pub const ALL: [Abuse; 4] = [
        Abuse::Resets,
        Abuse::ControlFrames,
        Abuse::SendTimeout,
        Abuse::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Abuse::Resets => "resets",
            Abuse::ControlFrames => "control_frames",
            Abuse::SendTimeout => "send_timeout",
            Abuse::Protocol => "protocol",
        }
    }
}

impl Metrics {
    /// The counters for a route name; the same name always gets the same counters, so a reload
    /// that keeps a route keeps its counts.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = routes.get(name) {
            return Arc::clone(m);
        }
        let m = Arc::<RouteMetrics>::default();
        routes.insert(name.into(), Arc::clone(&m));
        m
    }

    /// `route` for many names at once, under one lock; a new name is stored by sharing the
    /// caller's `Arc<str>` instead of copying it.
    pub fn routes<'a>(
        &self,
        names: impl ExactSizeIterator<Item = &'a Arc<str>>,
    ) -> Vec<Arc<RouteMetrics>> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.reserve(names.len());
        names
            .map(|name| Arc::clone(routes.entry(Arc::clone(name)).or_default()))
            .collect()
    }

    /// The counters for an upstream name, shared across reloads like `route`.
    pub fn upstream(&self, name: &str) -> Arc<UpstreamMetrics> {
        let mut upstreams = self
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(upstreams.entry(name.to_owned()).or_default())
    }

    /// The live state of the server with this key, the same `Arc` for the same key.
    pub fn server_state(&self, key: &Arc<str>) -> Arc<ServerState> {
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(servers.entry(Arc::clone(key)).or_default())
    }

    pub fn observe_request(&self, duration: Duration) {
        self.request_duration.observe(duration);
    }

    pub fn connection_opened(&self) {
        self.client_connections_active
            .fetch_add(1, Ordering::Relaxed);
        self.client_connections_total
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.client_connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// A client connection that speaks HTTP/2 (h2 by ALPN or h2c by prior knowledge).
    pub fn http2_connection(&self) {
        self.http2_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn http2_stream(&self) {
        self.http2_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn http2_abuse(&self, why: Abuse) {
        self.http2_abuse[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn http2_abuse_count(&self, why: Abuse) -> u64 {
        self.http2_abuse[why as usize].load(Ordering::Relaxed)
    }

    /// A TLS handshake that failed or timed out (a scanner, an old client, a wrong port).
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn access_log_entry_dropped(&self) {
        self.access_log_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn client_connections_active(&self) -> i64 {
        self.client_connections_active.load(Ordering::Relaxed)
    }

    pub fn client_connections_total(&self) -> u64 {
        self.client_connections_total.load(Ordering::Relaxed)
    }

    /// The whole registry in the Prometheus text exposition format, version 0.0.4.
    ///
    /// Names removed from the config keep being rendered (with frozen counts) until restart:
    /// counters that vanish and reappear would look like resets to `rate()`.
    pub fn render(&self) -> String {
        // Copy the Arcs out so the registry locks are not held while formatting.
        let mut routes: Vec<(Arc<str>, Arc<RouteMetrics>)> = {
            let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            routes
                .iter()
                .map(|(k, v)| (Arc::clone(k), Arc::clone(v)))
                .collect()
        };
        routes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let upstreams: Vec<(String, Arc<UpstreamMetrics>)> = {
            let upstreams = self
                .upstreams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            upstreams
                .iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect()
        };

        let mut out = String::with_capacity(4096);

        header(
            &mut out,
            REQUESTS_TOTAL,
            "counter",
            "Requests answered, by route and status class.",
        );
        for (name, route) in &routes {
            let name = escape_label(name);
            for (class, count) in CLASSES.iter().zip(&route.by_class) {
                let _ = writeln!(
                    out,
                    "{REQUESTS_TOTAL}{{route=\"{name}\",class=\"{class}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }

        let h = &self.request_duration;
        header(
            &mut out,
            REQUEST_DURATION_SECONDS,
            "histogram",
            "Time from the request head being read to the response being finished.",
        );
        let mut cumulative = 0u64;
        for ((_, le), bucket) in DURATION_BUCKETS.iter().zip(&h.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{REQUEST_DURATION_SECONDS}_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += h.buckets[DURATION_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{REQUEST_DURATION_SECONDS}_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        // The fields are read one by one while requests keep landing, so `_count` may trail the
        // buckets by a few; Prometheus tolerates that, and +Inf stays consistent with the buckets.
        let sum_secs = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{REQUEST_DURATION_SECONDS}_sum {sum_secs}");
        let _ = writeln!(
            out,
            "{REQUEST_DURATION_SECONDS}_count {}",
            h.count.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            CLIENT_CONNECTIONS_ACTIVE,
            "gauge",
            "Client connections currently open.",
        );
        let _ = writeln!(
            out,
            "{CLIENT_CONNECTIONS_ACTIVE} {}",
            self.client_connections_active()
        );
        header(
            &mut out,
            CLIENT_CONNECTIONS_TOTAL,
            "counter",
            "Client connections accepted.",
        );
        let _ = writeln!(
            out,
            "{CLIENT_CONNECTIONS_TOTAL} {}",
            self.client_connections_total()
        );

        let upstreams: Vec<(String, Arc<UpstreamMetrics>)> = upstreams
            .into_iter()
            .map(|(name, m)| (escape_label(&name), m))
            .collect();
        header(
            &mut out,
            UPSTREAM_CONNECTIONS_OPENED_TOTAL,
            "counter",
            "New connections opened to upstream servers.",
        );
        for (name, m) in &upstreams {
            let _ = writeln!(
                out,
                "{UPSTREAM_CONNECTIONS_OPENED_TOTAL}{{upstream=\"{name}\"}} {}",
                m.connections_opened.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            UPSTREAM_CONNECTIONS_REUSED_TOTAL,
            "counter",
            "Requests sent on an idle pooled upstream connection.",
        );
        for (name, m) in &upstreams {
            let _ = writeln!(
                out,
                "{UPSTREAM_CONNECTIONS_REUSED_TOTAL}{{upstream=\"{name}\"}} {}",
                m.connections_reused.load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            UPSTREAM_ERRORS_TOTAL,
            "counter",
            "Failed upstream exchanges, by kind.",
        );
        for (name, m) in &upstreams {
            for kind in UpstreamErrorKind::ALL {
                let _ = writeln!(
                    out,
                    "{UPSTREAM_ERRORS_TOTAL}{{upstream=\"{name}\",kind=\"{}\"}} {}",
                    kind.as_str(),
                    m.errors[kind as usize].load(Ordering::Relaxed)
                );
            }
        }

        let counters: [(&str, &str, CounterOf); 4] = [
            (
                UPSTREAM_RETRIES_TOTAL,
                "Tries after the first, sent to another server.",
                |m| &m.retries,
            ),
            (
                UPSTREAM_RETRIES_REFUSED_TOTAL,
                "Retries the retry budget refused.",
                |m| &m.retries_refused,
            ),
            (
                UPSTREAM_QUEUED_TOTAL,
                "Requests that waited for a server under its max_conns.",
                |m| &m.queued,
            ),
            (
                UPSTREAM_SATURATED_TOTAL,
                "Requests answered 503 because every server was at its max_conns.",
                |m| &m.saturated,
            ),
        ];
        for (metric, help, counter) in counters {
            header(&mut out, metric, "counter", help);
            for (name, m) in &upstreams {
                let _ = writeln!(
                    out,
                    "{metric}{{upstream=\"{name}\"}} {}",
                    counter(m).load(Ordering::Relaxed)
                );
            }
        }

        header(
            &mut out,
            TLS_HANDSHAKE_FAILURES_TOTAL,
            "counter",
            "TLS handshakes that failed or timed out.",
        );
        let _ = writeln!(
            out,
            "{TLS_HANDSHAKE_FAILURES_TOTAL} {}",
            self.tls_handshake_failures.load(Ordering::Relaxed)
        );

        header(
            &mut out,
            HTTP2_CONNECTIONS_TOTAL,
            "counter",
            "Client connections that spoke HTTP/2.",
        );
        let _ = writeln!(
            out,
            "{HTTP2_CONNECTIONS_TOTAL} {}",
            self.http2_connections.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            HTTP2_STREAMS_TOTAL,
            "counter",
            "HTTP/2 streams (requests) accepted from clients.",
        );
        let _ = writeln!(
            out,
            "{HTTP2_STREAMS_TOTAL} {}",
            self.http2_streams.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            HTTP2_ABUSE_TOTAL,
            "counter",
            "HTTP/2 client connections closed with ENHANCE_YOUR_CALM, by reason.",
        );
        for why in Abuse::ALL {
            let _ = writeln!(
                out,
                "{HTTP2_ABUSE_TOTAL}{{reason=\"{}\"}} {}",
                why.as_str(),
                self.http2_abuse[why as usize].load(Ordering::Relaxed)
            );
        }

        header(
            &mut out,
            ACCESS_LOG_DROPPED_TOTAL,
            "counter",
            "Access-log entries dropped because the writer fell behind.",
        );
        let _ = writeln!(
            out,
            "{ACCESS_LOG_DROPPED_TOTAL} {}",
            self.access_log_dropped.load(Ordering::Relaxed)
        );

        out
    }
}

/// The servers of the config in force: their state, load and counts. Rendered from the snapshot,
/// not the registry, so that a server DNS took away stops being shown.
pub fn render_servers(out: &mut String, snapshot: &Snapshot) {
    let now_ms = state::now_ms();
    let now_ns = state::now_ns();
    let lists: Vec<(String, Arc<Targets>, &Upstream)> = snapshot
        .upstreams
        .iter()
        .map(|u| (escape_label(&u.name), u.targets.load_full(), &**u))
        .collect();
    header(
        out,
        UPSTREAM_PENDING,
        "gauge",
        "Requests waiting for a server under its max_conns.",
    );
    for (name, _, upstream) in &lists {
        let _ = writeln!(
            out,
            "{UPSTREAM_PENDING}{{upstream=\"{name}\"}} {}",
            upstream.live.pending.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        SERVER_STATE,
        "gauge",
        "1 for the state each server is in: healthy, unhealthy (active checks), ejected (passive), draining.",
    );
    for (name, targets, _) in &lists {
        for s in &targets.servers {
            let current = s.state.condition(now_ms, s.drain);
            for c in [
                Condition::Healthy,
                Condition::Unhealthy,
                Condition::Ejected,
                Condition::Draining,
            ] {
                let _ = writeln!(
                    out,
                    "{SERVER_STATE}{{upstream=\"{name}\",server=\"{}\",state=\"{}\"}} {}",
                    s.address,
                    c.as_str(),
                    u8::from(c == current)
                );
            }
        }
    }
    let gauges: [(&str, &str, &str); 5] = [
        (
            SERVER_IN_FLIGHT,
            "gauge",
            "Requests in flight to each server.",
        ),
        (
            SERVER_LATENCY_EWMA_SECONDS,
            "gauge",
            "Peak-EWMA latency estimate of each server, as the latency-aware balancer sees it.",
        ),
        (
            SERVER_REQUESTS_TOTAL,
            "counter",
            "Requests sent to each server.",
        ),
        (
            SERVER_FAILURES_TOTAL,
            "counter",
            "Failed exchanges with each server (connect errors, resets, timeouts, counted 5xx).",
        ),
        (
            SERVER_EJECTIONS_TOTAL,
            "counter",
            "Times each server was ejected by passive health.",
        ),
    ];
    for (metric, kind, help) in gauges {
        header(out, metric, kind, help);
        for (name, targets, _) in &lists {
            for s in &targets.servers {
                let st = &s.state;
                let _ = write!(
                    out,
                    "{metric}{{upstream=\"{name}\",server=\"{}\"}} ",
                    s.address
                );
                let _ = match metric {
                    SERVER_IN_FLIGHT => writeln!(out, "{}", st.in_flight()),
                    SERVER_LATENCY_EWMA_SECONDS => writeln!(out, "{}", st.ewma.estimate(now_ns)),
                    SERVER_REQUESTS_TOTAL => writeln!(out, "{}", st.requests_total()),
                    SERVER_FAILURES_TOTAL => writeln!(out, "{}", st.failures_total()),
                    _ => writeln!(out, "{}", st.ejections_total()),
                };
            }
        }
    }
}

/// How reloads went: counts by result, whether the last one worked, when the config in force
/// was loaded (the names Prometheus itself uses for the same facts, with our prefix).
pub fn render_reloads(out: &mut String, status: &crate::reload::Status) {
    header(
        out,
        CONFIG_RELOADS_TOTAL,
        "counter",
        "Config reloads, by result.",
    );
    let _ = writeln!(
        out,
        "{CONFIG_RELOADS_TOTAL}{{result=\"success\"}} {}",
        status.reloads_ok
    );
    let _ = writeln!(
        out,
        "{CONFIG_RELOADS_TOTAL}{{result=\"failure\"}} {}",
        status.reloads_failed
    );
    header(
        out,
        CONFIG_LAST_RELOAD_SUCCESSFUL,
        "gauge",
        "1 if the last reload put its config in force (or none was tried), 0 if it failed.",
    );
    let _ = writeln!(
        out,
        "{CONFIG_LAST_RELOAD_SUCCESSFUL} {}",
        u8::from(status.last_error.is_none())
    );
    header(
        out,
        CONFIG_LOADED_TIMESTAMP_SECONDS,
        "gauge",
        "When the config in force was loaded, in seconds since the Unix epoch.",
    );
    let loaded = status
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = writeln!(out, "{CONFIG_LOADED_TIMESTAMP_SECONDS} {loaded}");
    header(
        out,
        CONFIG_GENERATION,
        "gauge",
        "1 for the config loaded at start, one more for each successful reload.",
    );
    let _ = writeln!(out, "{CONFIG_GENERATION} {}", status.generation);
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the exposition format requires: backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_counts(m: &RouteMetrics) -> [u64; 5] {
        std::array::from_fn(|i| m.by_class[i].load(Ordering::Relaxed))
    }

    #[test]
    fn record_maps_status_to_class() {
        let m = RouteMetrics::default();
        for status in [100, 101, 200, 204, 299, 301, 404, 499, 500, 503, 599] {
            m.record(status);
        }
        assert_eq!(class_counts(&m), [2, 3, 1, 2, 3]);
    }

    #[test]
    fn record_clamps_out_of_range_statuses() {
        let m = RouteMetrics::default();
        m.record(0);
        m.record(42);
        m.record(600);
        m.record(u16::MAX);
        assert_eq!(class_counts(&m), [2, 0, 0, 0, 2]);
    }

    #[test]
    fn same_name_same_counters() {
        let metrics = Metrics::default();
        let a = metrics.route("api");
        a.record(200);
        let b = metrics.route("api");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &metrics.route("other")));
        let u = metrics.upstream("backend");
        assert!(Arc::ptr_eq(&u, &metrics.upstream("backend")));
    }

    #[test]
    fn histogram_bucket_placement() {
        let h = DurationHistogram::default();
        // On a bound: counted in that bucket (le means less than or equal).
        h.observe(Duration::from_micros(500));
        // Just above a bound: the next bucket.
        h.observe(Duration::from_nanos(500_001));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        h.observe(Duration::from_secs(11));
        h.observe(Duration::ZERO);
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [2, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(h.count.load(Ordering::Relaxed), 6);
        assert_eq!(
            h.sum_micros.load(Ordering::Relaxed),
            500 + 500 + 3000 + 21_000_000
        );
    }

    #[test]
    fn connection_gauge_and_counter() {
        let m = Metrics::default();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        assert_eq!(m.client_connections_active(), 1);
        assert_eq!(m.client_connections_total(), 2);
    }

    #[test]
    fn render_format() {
        let m = Metrics::default();
        m.route("api").record(200);
        m.route("api").record(503);
        m.route("we\"ird\\\nname");
        let up = m.upstream("backend");
        up.connections_opened.fetch_add(3, Ordering::Relaxed);
        up.connections_reused.fetch_add(5, Ordering::Relaxed);
        up.error(UpstreamErrorKind::Timeout);
        m.observe_request(Duration::from_millis(2));
        m.observe_request(Duration::from_millis(20));
        m.connection_opened();
        m.access_log_entry_dropped();

        let text = m.render();
        let lines: Vec<&str> = text.lines().collect();
        let has = |l: &str| lines.contains(&l);

        assert!(has(
            "# HELP gatehouse_requests_total Requests answered, by route and status class."
        ));
        assert!(has("# TYPE gatehouse_requests_total counter"));
        assert!(has(
            r#"gatehouse_requests_total{route="api",class="1xx"} 0"#
        ));
        assert!(has(
            r#"gatehouse_requests_total{route="api",class="2xx"} 1"#
        ));
        assert!(has(
            r#"gatehouse_requests_total{route="api",class="5xx"} 1"#
        ));
        assert!(has(
            r#"gatehouse_requests_total{route="we\"ird\\\nname",class="3xx"} 0"#
        ));

        assert!(has("# TYPE gatehouse_request_duration_seconds histogram"));
        assert!(has(
            r#"gatehouse_request_duration_seconds_bucket{le="0.001"} 0"#
        ));
        assert!(has(
            r#"gatehouse_request_duration_seconds_bucket{le="0.0025"} 1"#
        ));
        assert!(has(
            r#"gatehouse_request_duration_seconds_bucket{le="0.025"} 2"#
        ));
        assert!(has(
            r#"gatehouse_request_duration_seconds_bucket{le="10"} 2"#
        ));
        assert!(has(
            r#"gatehouse_request_duration_seconds_bucket{le="+Inf"} 2"#
        ));
        assert!(has("gatehouse_request_duration_seconds_sum 0.022"));
        assert!(has("gatehouse_request_duration_seconds_count 2"));

        assert!(has("# TYPE gatehouse_client_connections_active gauge"));
        assert!(has("gatehouse_client_connections_active 1"));
        assert!(has("gatehouse_client_connections_total 1"));

        assert!(has(
            r#"gatehouse_upstream_connections_opened_total{upstream="backend"} 3"#
        ));
        assert!(has(
            r#"gatehouse_upstream_connections_reused_total{upstream="backend"} 5"#
        ));
        for kind in UpstreamErrorKind::ALL {
            let n = u64::from(kind == UpstreamErrorKind::Timeout);
            let line = format!(
                r#"gatehouse_upstream_errors_total{{upstream="backend",kind="{}"}} {n}"#,
                kind.as_str()
            );
            assert!(has(&line), "missing {line}");
        }
        assert!(has("gatehouse_access_log_dropped_total 1"));

        // Every family announces itself once, before its samples.
        for name in [
            REQUESTS_TOTAL,
            REQUEST_DURATION_SECONDS,
            CLIENT_CONNECTIONS_ACTIVE,
            CLIENT_CONNECTIONS_TOTAL,
            UPSTREAM_CONNECTIONS_OPENED_TOTAL,
            UPSTREAM_CONNECTIONS_REUSED_TOTAL,
            UPSTREAM_ERRORS_TOTAL,
            ACCESS_LOG_DROPPED_TOTAL,
        ] {
            let type_line = format!("# TYPE {name} ");
            assert_eq!(
                lines.iter().filter(|l| l.starts_with(&type_line)).count(),
                1,
                "{name}"
            );
            let first_type = lines.iter().position(|l| l.starts_with(&type_line));
            let first_sample = lines
                .iter()
                .position(|l| !l.starts_with('#') && l.starts_with(name));
            assert!(first_type < first_sample, "{name}");
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn empty_registry_still_renders_every_family() {
        let text = Metrics::default().render();
        assert!(text.contains("# TYPE gatehouse_requests_total counter\n"));
        assert!(text.contains("gatehouse_request_duration_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.contains("gatehouse_request_duration_seconds_sum 0\n"));
        assert!(text.contains("gatehouse_access_log_dropped_total 0\n"));
    }
}
