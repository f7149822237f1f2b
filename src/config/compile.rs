//! File form -> `Snapshot`: validates every value, resolves defaults and overrides, builds the router.
//!
//! Neighbours: `mod.rs` hands over the parsed `file::FileConfig`; the result is the immutable
//! `snapshot::Snapshot` that `app.rs` publishes. Every problem is collected rather than returned at
//! the first, so one `gatehouse check` run lists them all; a value that fails a check is replaced
//! by its default so that the checks after it still run. The file structs are destructured without
//! `..`, so a new key that this module forgets to read is a compile error, not an ignored setting.
//!
//! Resolution order, most specific first: route `timeouts`/`max_body_bytes` -> upstream `timeouts`
//! -> global `[timeouts]`/`[limits]` -> the built-in defaults in `defaults`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use arc_swap::ArcSwap;

use super::error::{line_col, Problem};
use super::file::{
    AccessValue, ClientAuthSection, DurationValue, FileConfig, GlobalTimeouts, Http2Section,
    LimitsSection, ListenerSection, LogSection, ReloadSection, ResolverSection, RespondSection,
    RouteSection, RouteTimeoutsSection, SizeValue, TlsCertSection, TlsValue,
};
use super::snapshot::{
    AccessTarget, AdminSettings, ConnLimits, ConnTimeouts, FixedResponse, HostMatch, Http2Settings,
    ListenerSettings, LogFormat, LogSettings, ResolverSettings, Route, RouteAction, ServerHost,
    Snapshot, Targets, TlsSettings, Upstream, UpstreamId, UpstreamTimeouts,
};
use super::values;
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::Router;

mod upstream;

/// The built-in defaults; `docs/config.md` lists the same values.
mod defaults {
    use std::time::Duration;

    pub const CLIENT_HEADER: Duration = Duration::from_secs(10);
    pub const CLIENT_BODY: Duration = Duration::from_secs(60);
    pub const CLIENT_IDLE: Duration = Duration::from_secs(75);
    pub const CONNECT: Duration = Duration::from_secs(5);
    pub const RESPONSE_HEADER: Duration = Duration::from_secs(60);
    pub const UPSTREAM_READ: Duration = Duration::from_secs(60);
    pub const UPSTREAM_WRITE: Duration = Duration::from_secs(60);
    pub const UPSTREAM_IDLE: Duration = Duration::from_secs(60);
    pub const TUNNEL_IDLE: Duration = Duration::from_secs(3600);
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

    pub const MAX_HEADER_BYTES: u64 = 16 * 1024;
    pub const MAX_HEADERS: i64 = 100;
    pub const MAX_URI_BYTES: u64 = 8 * 1024;
    pub const MAX_BODY_BYTES: u64 = 1024 * 1024;
    pub const MAX_CONNECTIONS: i64 = 10_000;

    pub const KEEPALIVE: i64 = 128;
    pub const MAX_PENDING: u32 = 0;
    pub const RESOLVER_TIMEOUT: Duration = Duration::from_secs(5);
    pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
    pub const RESOLVER_MIN_TTL: Duration = Duration::from_secs(1);
    pub const RESOLVER_MAX_TTL: Duration = Duration::from_secs(300);
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    pub const CHECK_RISE: u32 = 2;
    pub const CHECK_FALL: u32 = 3;
    pub const CONSECUTIVE_FAILURES: u32 = 5;
    pub const BASE_EJECTION: Duration = Duration::from_secs(10);
    pub const MAX_EJECTION: Duration = Duration::from_secs(300);
    pub const ATTEMPTS: u32 = 3;
    pub const RETRY_BUDGET: f64 = 0.2;
    pub const RETRY_MIN_PER_SECOND: u32 = 10;
    pub const WEIGHT: i64 = 1;
    pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

    pub const H2_MAX_CONCURRENT_STREAMS: i64 = 100;
    pub const H2_MAX_HEADER_LIST_SIZE: u64 = 32 * 1024;
    pub const H2_STREAM_WINDOW: u64 = 256 * 1024;
    pub const H2_CONNECTION_WINDOW: u64 = 1024 * 1024;
    pub const H2_MAX_PENDING_RESETS: i64 = 20;
    pub const H2_MAX_CLIENT_RESETS: i64 = 100;
    pub const H2_MAX_LOCAL_ERROR_RESETS: i64 = 200;
    pub const H2_MAX_CONTROL_FRAMES: i64 = 500;
    pub const H2_SEND_TIMEOUT: Duration = Duration::from_secs(60);
}

const MAX_WORKERS: i64 = 1024;
const MAX_WEIGHT: i64 = 1000;

/// Validates and resolves `file`. `text` is the file's text, used only to name the line of an
/// earlier definition in "duplicate" messages.
pub(crate) fn compile(
    text: &str,
    base_dir: &Path,
    file: FileConfig,
    metrics: &Metrics,
) -> Result<Snapshot, Vec<Problem>> {
    let FileConfig {
        workers,
        log,
        admin,
        timeouts,
        limits,
        resolver,
        reload,
        http2,
        listener,
        upstream,
        route,
    } = file;
    let mut c = Checker {
        text,
        base_dir,
        problems: Vec::new(),
    };

    let workers = workers.and_then(|w| c.int_in(&w, "workers", 1..=MAX_WORKERS));
    let log = c.log(log);
    let admin = admin.and_then(|a| {
        let listen = c.check(a.listen.span(), values::listen_addr(a.listen.get_ref()))?;
        Some((AdminSettings { listen }, a.listen.span()))
    });
    let globals = c.global_timeouts(timeouts);
    let limits = c.limits(limits);
    let resolver = c.resolver(resolver);
    let watch = c.watch(reload);
    let http2 = c.http2(http2);
    let listeners = c.listeners(listener, &limits, admin.as_ref());
    let upstreams = c.upstreams(upstream, &globals);
    let routes = c.routes(route, &upstreams, &globals, &limits);

    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    // Metrics are attached only now, so a rejected file adds no names to the registry.
    let upstreams: Vec<Arc<Upstream>> = upstreams
        .into_iter()
        .map(|mut u| {
            u.metrics = metrics.upstream(&u.name);
            // Addresses are known now; names join when `upstream::resolve` has answers.
            let fixed: Vec<_> = u
                .specs
                .iter()
                .filter_map(|s| match s.host {
                    ServerHost::Addr(a) => Some((a, s)),
                    ServerHost::Name { .. } => None,
                })
                .collect();
            let targets = Targets::build(&u.name, &u.balance.algorithm, &fixed, metrics);
            u.targets = ArcSwap::from_pointee(targets);
            Arc::new(u)
        })
        .collect();
    let route_metrics = metrics.routes(routes.iter().map(|r| &r.name));
    let routes: Vec<Arc<Route>> = routes
        .into_iter()
        .zip(route_metrics)
        .map(|(mut r, m)| {
            r.metrics = m;
            Arc::new(r)
        })
        .collect();
    let router = Router::build(&routes);
    Ok(Snapshot {
        workers: workers.map(|w| w.unsigned_abs() as usize),
        log,
        admin: admin.map(|(a, _)| a),
        listeners,
        upstreams,
        routes,
        router,
        limits: limits.conn,
        timeouts: globals.conn,
        resolver,
        watch,
        http2,
    })
}

/// Global `[timeouts]`, resolved, split by who reads them.
struct Globals {
    conn: ConnTimeouts,
    client_body: Duration,
    upstream: UpstreamTimeouts,
}

/// `[limits]`, resolved.
struct Limits {
    conn: ConnLimits,
    max_body_bytes: u64,
    max_connections: usize,
}

struct Checker<'a> {
    text: &'a str,
    /// Where relative file names start (see `config::base_dir`).
    base_dir: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    /// A file name from the config, relative ones taken from the config file's directory.
    fn file_path(&self, name: &str) -> String {
        let path = Path::new(name);
        if path.is_absolute() {
            name.to_owned()
        } else {
            self.base_dir.join(path).display().to_string()
        }
    }

    fn report(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push(Problem {
            span,
            message: message.into(),
        });
    }

    fn check<T>(&mut self, span: Range<usize>, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.report(span, message)).ok()
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    fn int_in(
        &mut self,
        value: &Spanned<i64>,
        what: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let v = *value.get_ref();
        if range.contains(&v) {
            Some(v)
        } else if *range.end() == i64::MAX {
            let message = format!("{what} must be at least {}, got {v}", range.start());
            self.report(value.span(), message);
            None
        } else {
            let message = format!(
                "{what} must be between {} and {}, got {v}",
                range.start(),
                range.end()
            );
            self.report(value.span(), message);
            None
        }
    }

    fn usize_at_least(
        &mut self,
        value: Option<Spanned<i64>>,
        what: &str,
        min: i64,
        default: i64,
    ) -> usize {
        let v = value
            .and_then(|v| self.int_in(&v, what, min..=i64::MAX))
            .unwrap_or(default);
        usize::try_from(v).unwrap_or(usize::MAX)
    }

    fn duration(&mut self, value: Option<Spanned<DurationValue>>, default: Duration) -> Duration {
        value
            .and_then(|v| self.check(v.span(), values::duration(v.get_ref())))
            .unwrap_or(default)
    }

    fn size(&mut self, value: Option<Spanned<SizeValue>>, default: u64) -> u64 {
        value
            .and_then(|v| self.check(v.span(), values::size(v.get_ref())))
            .unwrap_or(default)
    }

    /// A size that indexes memory: it must also fit this machine's `usize`.
    fn size_usize(&mut self, value: Option<Spanned<SizeValue>>, default: u64) -> usize {
        let span = value.as_ref().map(|v| v.span());
        let bytes = self.size(value, default);
        match (usize::try_from(bytes), span) {
            (Ok(n), _) => n,
            (Err(_), Some(span)) => {
                self.report(span, format!("size {bytes} is too large for this machine"));
                usize::MAX
            }
            (Err(_), None) => usize::MAX,
        }
    }

    fn log(&mut self, log: LogSection) -> LogSettings {
        let LogSection { access, format } = log;
        let access = match access {
            None => AccessTarget::Stdout,
            Some(v) => match v.get_ref() {
                AccessValue::Off => AccessTarget::Off,
                AccessValue::Target(t) if t == "stdout" => AccessTarget::Stdout,
                AccessValue::Target(t) if t == "stderr" => AccessTarget::Stderr,
                AccessValue::Target(t) if t.is_empty() => {
                    self.report(
                        v.span(),
                        "log.access is empty: expected \"stdout\", \"stderr\", a file path, or false",
                    );
                    AccessTarget::Stdout
                }
                AccessValue::Target(t) => AccessTarget::File(PathBuf::from(t)),
            },
        };
        let format = match format {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    let message =
                        format!("bad log.format {other:?}: expected \"text\" or \"json\"");
                    self.report(f.span(), message);
                    LogFormat::Text
                }
            },
        };
        LogSettings { access, format }
    }

    fn global_timeouts(&mut self, t: GlobalTimeouts) -> Globals {
        let GlobalTimeouts {
            client_header,
            client_body,
            client_idle,
            connect,
            response_header,
            upstream_read,
            upstream_write,
            upstream_idle,
            tunnel_idle,
            shutdown_grace,
        } = t;
        Globals {
            conn: ConnTimeouts {
                client_header: self.duration(client_header, defaults::CLIENT_HEADER),
                client_idle: self.duration(client_idle, defaults::CLIENT_IDLE),
                shutdown_grace: self.duration(shutdown_grace, defaults::SHUTDOWN_GRACE),
            },
            client_body: self.duration(client_body, defaults::CLIENT_BODY),
            upstream: UpstreamTimeouts {
                connect: self.duration(connect, defaults::CONNECT),
                response_header: self.duration(response_header, defaults::RESPONSE_HEADER),
                read: self.duration(upstream_read, defaults::UPSTREAM_READ),
                write: self.duration(upstream_write, defaults::UPSTREAM_WRITE),
                idle: self.duration(upstream_idle, defaults::UPSTREAM_IDLE),
                tunnel_idle: self.duration(tunnel_idle, defaults::TUNNEL_IDLE),
            },
        }
    }

    /// Reads and checks every certificate and key now, so that `check` names a missing, bad or
    /// mismatched file, and builds the listener's TLS config from them.
    fn tls(
        &mut self,
        tls: Spanned<TlsValue>,
        client_auth: Option<Spanned<ClientAuthSection>>,
        http2: bool,
    ) -> Option<TlsSettings> {
        let span = tls.span();
        let entries: Vec<(TlsCertSection, Range<usize>)> = match tls.into_inner() {
            TlsValue::One(one) => vec![(one, span.clone())],
            TlsValue::Many(many) => many
                .into_iter()
                .map(|m| {
                    let s = m.span();
                    (m.into_inner(), s)
                })
                .collect(),
        };
        if entries.is_empty() {
            self.report(
                span,
                "tls is an empty list: give at least one { cert, key }",
            );
            return None;
        }
        let mut loaded = Vec::with_capacity(entries.len());
        for (TlsCertSection { cert, key }, _) in entries {
            let files = crate::tls::CertFiles {
                cert: self.file_path(cert.get_ref()),
                key: self.file_path(key.get_ref()),
            };
            match crate::tls::load(&files) {
                Ok(l) => loaded.push(l),
                Err(e) => {
                    // Point at the file the problem is in.
                    let at = match e {
                        crate::tls::TlsError::Read { what: "key", .. }
                        | crate::tls::TlsError::NoKey { .. }
                        | crate::tls::TlsError::BadKey { .. } => key.span(),
                        _ => cert.span(),
                    };
                    self.report(at, e.to_string());
                }
            }
        }
        let (clients, subject_header) = match client_auth {
            None => (None, None),
            Some(auth) => {
                let ClientAuthSection {
                    ca,
                    required,
                    subject_header,
                } = auth.into_inner();
                let header = subject_header.and_then(|h| {
                    self.check(h.span(), values::header_name(h.get_ref()))
                        .map(|()| Arc::<str>::from(h.into_inner().to_ascii_lowercase()))
                });
                match crate::tls::client_roots(&self.file_path(ca.get_ref())) {
                    Ok(roots) => (
                        Some(crate::tls::ClientAuth {
                            roots,
                            required: required.unwrap_or(true),
                        }),
                        header,
                    ),
                    Err(e) => {
                        self.report(ca.span(), e.to_string());
                        (None, None)
                    }
                }
            }
        };
        if !self.problems.is_empty() {
            return None;
        }
        match crate::tls::server_config(loaded, clients, http2) {
            Ok(config) => Some(TlsSettings {
                config,
                subject_header,
            }),
            Err(e) => {
                self.report(span, e.to_string());
                None
            }
        }
    }

    fn watch(&mut self, r: ReloadSection) -> Option<Duration> {
        let ReloadSection { watch, interval } = r;
        let span = interval.as_ref().map(|i| i.span());
        let every = self.duration(interval, defaults::WATCH_INTERVAL);
        if let (Some(false) | None, Some(span)) = (watch, span) {
            self.report(span, "reload.interval has no effect without watch = true");
        }
        watch.unwrap_or(false).then_some(every)
    }

    fn resolver(&mut self, r: ResolverSection) -> ResolverSettings {
        let ResolverSection {
            nameservers,
            timeout,
            min_ttl,
            max_ttl,
        } = r;
        let nameservers = nameservers.map_or_else(Vec::new, |list| {
            list.into_inner()
                .into_iter()
                .filter_map(|n| self.check(n.span(), values::nameserver(n.get_ref())))
                .collect()
        });
        // A crossed range is reported at whichever end the file sets.
        let span = max_ttl
            .as_ref()
            .map(|m| m.span())
            .or_else(|| min_ttl.as_ref().map(|m| m.span()));
        let settings = ResolverSettings {
            nameservers,
            timeout: self.duration(timeout, defaults::RESOLVER_TIMEOUT),
            min_ttl: self.duration(min_ttl, defaults::RESOLVER_MIN_TTL),
            max_ttl: self.duration(max_ttl, defaults::RESOLVER_MAX_TTL),
        };
        if let Some(span) = span.filter(|_| settings.max_ttl < settings.min_ttl) {
            let message = format!(
                "resolver.max_ttl ({:?}) must be at least min_ttl ({:?})",
                settings.max_ttl, settings.min_ttl
            );
            self.report(span, message);
        }
        settings
    }

    fn limits(&mut self, l: LimitsSection) -> Limits {
        let LimitsSection {
            max_header_bytes,
            max_headers,
            max_uri_bytes,
            max_body_bytes,
            max_connections,
        } = l;
        Limits {
            conn: ConnLimits {
                max_header_bytes: self.size_usize(max_header_bytes, defaults::MAX_HEADER_BYTES),
                max_headers: self.usize_at_least(
                    max_headers,
                    "limits.max_headers",
                    1,
                    defaults::MAX_HEADERS,
                ),
                max_uri_bytes: self.size_usize(max_uri_bytes, defaults::MAX_URI_BYTES),
            },
            max_body_bytes: self.size(max_body_bytes, defaults::MAX_BODY_BYTES),
            max_connections: self.usize_at_least(
                max_connections,
                "limits.max_connections",
                1,
                defaults::MAX_CONNECTIONS,
            ),
        }
    }

    fn http2(&mut self, section: Http2Section) -> Http2Settings {
        let Http2Section {
            max_concurrent_streams,
            max_header_list_size,
            stream_window,
            connection_window,
            max_pending_resets,
            max_client_resets,
            max_local_error_resets,
            max_control_frames,
            send_timeout,
        } = section;
        let count = |c: &mut Self, v: Option<Spanned<i64>>, what: &str, min, max, default| {
            v.and_then(|v| c.int_in(&v, what, min..=max))
                .unwrap_or(default)
        };
        // RFC 9113 §6.9.1: a flow-control window is at most 2^31-1 bytes; §6.5.2 takes 64 KiB-1
        // as every window's starting size, so a smaller one would only slow clients down.
        let window = |c: &mut Self, v: Option<Spanned<SizeValue>>, what: &str, default| {
            let span = v.as_ref().map(|v| v.span());
            let bytes = c.size(v, default);
            match (u32::try_from(bytes).ok().filter(|b| *b < 1 << 31), span) {
                (Some(b), Some(span)) if b < 65_535 => {
                    c.report(span, format!("http2.{what} must be at least 65535 bytes"));
                    65_535
                }
                (Some(b), _) => b,
                (None, Some(span)) => {
                    c.report(span, format!("http2.{what} must be below 2GiB (RFC 9113)"));
                    65_535
                }
                (None, None) => 65_535,
            }
        };
        let stream_window = window(
            self,
            stream_window,
            "stream_window",
            defaults::H2_STREAM_WINDOW,
        );
        let connection_window = window(
            self,
            connection_window,
            "connection_window",
            defaults::H2_CONNECTION_WINDOW,
        );
        let header_span = max_header_list_size.as_ref().map(|v| v.span());
        let header_bytes = self.size(max_header_list_size, defaults::H2_MAX_HEADER_LIST_SIZE);
        let max_header_list_size = match (u32::try_from(header_bytes), header_span) {
            (Ok(b), _) if b <= 16 << 20 => b,
            (_, Some(span)) => {
                self.report(span, "http2.max_header_list_size must be at most 16MiB");
                16 << 20
            }
            (_, None) => 16 << 20,
        };
        let as_u32 = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
        let as_usize = |n: i64| usize::try_from(n).unwrap_or(usize::MAX);
        Http2Settings {
            max_concurrent_streams: as_u32(count(
                self,
                max_concurrent_streams,
                "http2.max_concurrent_streams",
                1,
                10_000,
                defaults::H2_MAX_CONCURRENT_STREAMS,
            )),
            max_header_list_size,
            stream_window,
            connection_window,
            max_pending_resets: as_usize(count(
                self,
                max_pending_resets,
                "http2.max_pending_resets",
                1,
                100_000,
                defaults::H2_MAX_PENDING_RESETS,
            )),
            max_client_resets: count(
                self,
                max_client_resets,
                "http2.max_client_resets",
                1,
                1_000_000,
                defaults::H2_MAX_CLIENT_RESETS,
            )
            .unsigned_abs(),
            max_local_error_resets: as_usize(count(
                self,
                max_local_error_resets,
                "http2.max_local_error_resets",
                1,
                1_000_000,
                defaults::H2_MAX_LOCAL_ERROR_RESETS,
            )),
            max_control_frames: as_u32(count(
                self,
                max_control_frames,
                "http2.max_control_frames",
                1,
                1_000_000,
                defaults::H2_MAX_CONTROL_FRAMES,
            )),
            send_timeout: self.duration(send_timeout, defaults::H2_SEND_TIMEOUT),
        }
    }

    fn listeners(
        &mut self,
        listeners: Vec<Spanned<ListenerSection>>,
        limits: &Limits,
        admin: Option<&(AdminSettings, Range<usize>)>,
    ) -> Vec<ListenerSettings> {
        if listeners.is_empty() {
            self.report(
                0..0,
                "no [[listener]]: add one, such as [[listener]] name = \"web\" listen = \"127.0.0.1:8080\"",
            );
        }
        let mut names: HashMap<String, Range<usize>> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, (String, Range<usize>)> = HashMap::new();
        let mut out = Vec::with_capacity(listeners.len());
        for l in listeners {
            let ListenerSection {
                name,
                listen,
                max_connections,
                tls,
                client_auth,
                http2,
            } = l.into_inner();
            // HTTP/2 is offered by default where ALPN can negotiate it; cleartext HTTP/2 only
            // on request, since a plain port usually faces clients that speak HTTP/1.1 only.
            let http2 = http2.unwrap_or(tls.is_some());
            let tls = match (tls, client_auth) {
                (Some(t), auth) => self.tls(t, auth, http2),
                (None, Some(auth)) => {
                    self.report(
                        auth.span(),
                        "client_auth needs tls on the listener: client certificates come in the TLS handshake",
                    );
                    None
                }
                (None, None) => None,
            };
            self.check(name.span(), values::name("listener", name.get_ref()));
            if let Some(first) = names.get(name.get_ref()) {
                let message = format!(
                    "duplicate listener name {:?} (first used on line {})",
                    name.get_ref(),
                    self.line_of(first)
                );
                self.report(name.span(), message);
            } else {
                names.insert(name.get_ref().clone(), name.span());
            }
            let addr = self.check(listen.span(), values::listen_addr(listen.get_ref()));
            // Port 0 asks the kernel for a fresh port on each bind, so it cannot collide.
            if let Some(addr) = addr.filter(|a| a.port() != 0) {
                if let Some((first, first_span)) = addrs.get(&addr) {
                    let message = format!(
                        "listener address {addr} is already used by listener {first:?} (line {})",
                        self.line_of(first_span)
                    );
                    self.report(listen.span(), message);
                } else {
                    addrs.insert(addr, (name.get_ref().clone(), listen.span()));
                }
            }
            let max_connections = self.usize_at_least(
                max_connections,
                "max_connections",
                1,
                i64::try_from(limits.max_connections).unwrap_or(i64::MAX),
            );
            out.push(ListenerSettings {
                name: name.into_inner(),
                listen: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                max_connections,
                tls,
                http2,
            });
        }
        if let Some((admin, span)) = admin {
            if let Some((name, _)) = addrs.get(&admin.listen) {
                let message = format!(
                    "admin.listen {} is already used by listener {name:?}",
                    admin.listen
                );
                self.report(span.clone(), message);
            }
        }
        out
    }

    fn routes(
        &mut self,
        routes: Vec<Spanned<RouteSection>>,
        upstreams: &[Upstream],
        globals: &Globals,
        limits: &Limits,
    ) -> Vec<Route> {
        // Keyed by the route's own `Arc<str>`, so a name is not copied to be checked.
        let mut names: FastMap<Arc<str>, Range<usize>> =
            FastMap::with_capacity_and_hasher(routes.len(), Default::default());
        // Identical paths (most often `/`) share one allocation.
        let mut paths: HashSet<Arc<str>, foldhash::fast::RandomState> = HashSet::default();
        let mut pending: Vec<Pending> = Vec::with_capacity(routes.len());
        let mut auto_name = String::new();
        // Replaced by the registry's counters once the whole file has passed.
        let placeholder = Arc::<RouteMetrics>::default();
        for (index, route) in routes.into_iter().enumerate() {
            let route_span = route.span();
            let RouteSection {
                name,
                host,
                path,
                upstream,
                respond,
                max_body_bytes,
                timeouts,
                access_log,
                retry_with_body,
            } = route.into_inner();

            let (name, name_span): (Arc<str>, _) = match name {
                Some(n) => {
                    self.check(n.span(), values::name("route", n.get_ref()));
                    (n.get_ref().as_str().into(), n.span())
                }
                None => {
                    use std::fmt::Write as _;
                    auto_name.clear();
                    let _ = write!(auto_name, "route{}", index + 1);
                    (auto_name.as_str().into(), route_span.clone())
                }
            };
            if let Some(first) = names.get(&name) {
                let message = format!(
                    "duplicate route name {name:?} (first used on line {}); route names must be unique",
                    self.line_of(first)
                );
                self.report(name_span, message);
            } else {
                names.insert(Arc::clone(&name), name_span);
            }

            let host = host.and_then(|h| self.check(h.span(), values::host(h.get_ref())));
            self.check(path.span(), values::path(path.get_ref()));
            let path_span = path.span();
            let path: Arc<str> = match paths.get(path.get_ref().as_str()) {
                Some(p) => Arc::clone(p),
                None => {
                    let p: Arc<str> = path.into_inner().into();
                    paths.insert(Arc::clone(&p));
                    p
                }
            };

            let RouteTimeoutsSection {
                client_body,
                response_header,
                upstream_read,
                upstream_write,
                tunnel_idle,
            } = timeouts.unwrap_or_default();
            let client_body_timeout = self.duration(client_body, globals.client_body);
            let overrides = [response_header, upstream_read, upstream_write, tunnel_idle];
            let (action, upstream_timeouts) = match (upstream, respond) {
                (Some(u), Some(r)) => {
                    let later = if u.span().start > r.span().start {
                        u.span()
                    } else {
                        r.span()
                    };
                    self.report(
                        later,
                        "a route takes either `upstream` or `respond`, not both; keep one",
                    );
                    (None, None)
                }
                (None, None) => {
                    let message = format!(
                        "route {name:?} needs `upstream = \"<name>\"` or `respond = {{ status = 200 }}`"
                    );
                    self.report(route_span, message);
                    (None, None)
                }
                (Some(u), None) => match self.proxy(&u, upstreams, overrides) {
                    Some((id, timeouts)) => (Some(RouteAction::Proxy(id)), Some(timeouts)),
                    None => (None, None),
                },
                (None, Some(r)) => {
                    // These only time the exchange with an upstream, which this route never has.
                    let keys = [
                        "response_header",
                        "upstream_read",
                        "upstream_write",
                        "tunnel_idle",
                    ];
                    for (key, value) in keys.into_iter().zip(overrides) {
                        if let Some(v) = value {
                            let message = format!(
                                "timeouts.{key} has no effect on a route that uses `respond`; remove it"
                            );
                            self.report(v.span(), message);
                        }
                    }
                    let fixed = self.respond(r).map(Box::new);
                    (fixed.map(RouteAction::Respond), None)
                }
            };

            let max_body_bytes = self.size(max_body_bytes, limits.max_body_bytes);
            pending.push(Pending {
                path_span,
                route: action.map(|action| Route {
                    name: Arc::clone(&name),
                    host: None,
                    path: Arc::clone(&path),
                    action,
                    max_body_bytes,
                    client_body_timeout,
                    upstream_timeouts,
                    access_log: access_log.unwrap_or(true),
                    retry_with_body: retry_with_body.unwrap_or(false),
                    metrics: Arc::clone(&placeholder),
                }),
                name,
                host,
                path,
            });
        }
        drop(names);
        drop(paths);

        // Two routes with the same (host, path): the router could only ever pick one. The path
        // is the only place this check reports at, so running it after the loop above keeps the
        // order of the messages.
        {
            let mut pairs: FastMap<PairKey<'_>, usize> =
                FastMap::with_capacity_and_hasher(pending.len(), Default::default());
            let mut duplicates = Vec::new();
            for (i, p) in pending.iter().enumerate() {
                let host = p.host.as_ref().map(|h| match h {
                    HostMatch::Exact(s) => (false, &**s),
                    HostMatch::Suffix(s) => (true, &**s),
                });
                match pairs.entry((host, &*p.path)) {
                    Entry::Occupied(first) => duplicates.push((i, *first.get())),
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                }
            }
            drop(pairs);
            for (i, first) in duplicates {
                let (p, first) = (&pending[i], &pending[first]);
                let message = format!(
                    "route {:?} has the same host and path as route {:?} (line {}); only one could ever match",
                    p.name,
                    first.name,
                    self.line_of(&first.path_span)
                );
                self.report(p.path_span.clone(), message);
            }
        }

        // A failed check leaves no action; the whole compile fails, so no route is built.
        pending
            .into_iter()
            .filter_map(|p| {
                let mut route = p.route?;
                route.host = p.host;
                Some(route)
            })
            .collect()
    }

    /// A proxy route's upstream and its timeouts: the upstream's, with the route's
    /// `response_header`, `upstream_read` and `upstream_write` overrides (in that order) applied.
    fn proxy(
        &mut self,
        upstream: &Spanned<String>,
        upstreams: &[Upstream],
        [response_header, read, write, tunnel_idle]: [Option<Spanned<DurationValue>>; 4],
    ) -> Option<(UpstreamId, UpstreamTimeouts)> {
        let Some(i) = upstreams.iter().position(|u| &u.name == upstream.get_ref()) else {
            let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let message = if known.is_empty() {
                format!(
                    "unknown upstream {:?}: no [upstream.<name>] is defined",
                    upstream.get_ref()
                )
            } else {
                format!(
                    "unknown upstream {:?} (defined: {})",
                    upstream.get_ref(),
                    known.join(", ")
                )
            };
            self.report(upstream.span(), message);
            return None;
        };
        let base = upstreams[i].timeouts;
        let timeouts = UpstreamTimeouts {
            connect: base.connect,
            response_header: self.duration(response_header, base.response_header),
            read: self.duration(read, base.read),
            write: self.duration(write, base.write),
            idle: base.idle,
            tunnel_idle: self.duration(tunnel_idle, base.tunnel_idle),
        };
        Some((UpstreamId(i), timeouts))
    }

    fn respond(&mut self, r: Spanned<RespondSection>) -> Option<FixedResponse> {
        let RespondSection {
            status,
            body,
            content_type,
        } = r.into_inner();
        let code = self.int_in(&status, "respond.status", 200..=599);
        let body_text = body.as_ref().map_or("", |b| b.get_ref().as_str());
        // RFC 9110 §15.3.5 and §15.4.5: 204 and 304 responses end at the head.
        if let (Some(c @ (204 | 304)), Some(b)) = (code, &body) {
            if !b.get_ref().is_empty() {
                self.report(
                    b.span(),
                    format!("a {c} response cannot have a body (RFC 9110); remove `body`"),
                );
            }
        }
        let content_type = match content_type {
            None => defaults::CONTENT_TYPE.to_owned(),
            Some(ct) => {
                // A header value: visible ASCII, spaces and tabs (RFC 9110 §5.5); a CR or LF here
                // would let the config inject headers.
                let ok = ct
                    .get_ref()
                    .bytes()
                    .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
                if !ok || ct.get_ref().trim().is_empty() {
                    self.report(
                        ct.span(),
                        "respond.content_type must be a non-empty header value of visible ASCII characters",
                    );
                }
                ct.into_inner()
            }
        };
        Some(FixedResponse {
            status: u16::try_from(code?).ok()?,
            body: bytes::Bytes::from(body_text.to_owned()),
            content_type,
        })
    }
}

/// One route between its checks and the duplicate (host, path) check.
struct Pending {
    name: Arc<str>,
    host: Option<HostMatch>,
    path: Arc<str>,
    path_span: Range<usize>,
    /// `None` when a check failed; `host` is filled in at the end.
    route: Option<Route>,
}

/// A route's (host as (is a suffix, name), path) in the duplicate check.
type PairKey<'a> = (Option<(bool, &'a str)>, &'a str);

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
