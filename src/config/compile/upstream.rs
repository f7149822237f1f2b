//! The `[upstream.NAME]` tables: servers, balancing, health checks, passive health, retries and
//! the wait queue, each checked like the rest of the file.
//!
//! Neighbours: `compile.rs` calls `Checker::upstreams` and, for each route that proxies, looks
//! the upstream up by name; the results are `snapshot::Upstream`s whose server list the end of
//! `compile` fills in.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use toml::Spanned;

use super::{defaults, Checker, Globals, MAX_WEIGHT};
use crate::balance::{Algorithm, HashKey};
use crate::config::file::{
    HealthCheckSection, OutlierSection, RetrySection, ServerEntry, ServerTable, UpstreamSection,
    UpstreamTimeoutsSection, UpstreamTlsSection, UpstreamTlsValue,
};
use crate::config::snapshot::{
    BalanceSettings, HealthCheckKind, HealthCheckSettings, HostMatch, OutlierSettings,
    QueueSettings, RetrySettings, ServerHost, ServerSpec, StatusSet, Targets, Upstream,
    UpstreamLive, UpstreamProtocol, UpstreamTimeouts,
};
use crate::config::values;
use crate::upstream::tls::{SetupError, TlsFiles, UpstreamTls};

impl Checker<'_> {
    /// Upstreams in file order, so that `UpstreamId`s follow the file. Metrics are placeholders.
    pub(super) fn upstreams(
        &mut self,
        upstreams: std::collections::BTreeMap<Spanned<String>, UpstreamSection>,
        globals: &Globals,
    ) -> Vec<Upstream> {
        let mut upstreams: Vec<_> = upstreams.into_iter().collect();
        upstreams.sort_by_key(|(name, _)| name.span().start);
        let mut out = Vec::with_capacity(upstreams.len());
        for (name, section) in upstreams {
            self.check(name.span(), values::name("upstream", name.get_ref()));
            out.push(self.upstream(name.into_inner(), section, globals));
        }
        out
    }

    fn upstream(&mut self, name: String, section: UpstreamSection, globals: &Globals) -> Upstream {
        let UpstreamSection {
            servers,
            protocol,
            keepalive,
            timeouts,
            balance,
            hash_key,
            sticky_cookie,
            slow_start,
            panic_threshold,
            max_conns,
            max_pending,
            queue_timeout,
            health_check,
            outlier,
            retry,
            tls,
        } = section;
        let servers_span = servers.span();
        if servers.get_ref().is_empty() {
            self.report(
                servers_span.clone(),
                format!("upstream {name:?} has no servers: list at least one \"IP:port\""),
            );
        }
        let default_max_conns = max_conns
            .and_then(|m| self.int_in(&m, "max_conns", 0..=i64::from(u32::MAX)))
            .unwrap_or(0);
        let mut seen: HashMap<ServerHost, Range<usize>> = HashMap::new();
        let mut specs = Vec::with_capacity(servers.get_ref().len());
        for entry in servers.into_inner() {
            let span = entry.span();
            let (address, address_span, weight, backup, drain, max_conns) = match entry.into_inner()
            {
                ServerEntry::Address(address) => (address, span, None, None, None, None),
                ServerEntry::Table(ServerTable {
                    address,
                    weight,
                    backup,
                    drain,
                    max_conns,
                }) => {
                    let address_span = address.span();
                    (
                        address.into_inner(),
                        address_span,
                        weight,
                        backup,
                        drain,
                        max_conns,
                    )
                }
            };
            let weight = weight
                .and_then(|w| self.int_in(&w, "weight", 1..=MAX_WEIGHT))
                .unwrap_or(defaults::WEIGHT);
            let max_conns = max_conns
                .and_then(|m| self.int_in(&m, "max_conns", 0..=i64::from(u32::MAX)))
                .unwrap_or(default_max_conns);
            let Some(host) = self.check(address_span.clone(), values::server_addr(&address)) else {
                continue;
            };
            if let Some(first) = seen.get(&host) {
                let message = format!(
                    "server {address} is listed twice in upstream {name:?} (first on line {}); raise its weight instead",
                    self.line_of(first)
                );
                self.report(address_span, message);
                continue;
            }
            seen.insert(host.clone(), address_span);
            specs.push(ServerSpec {
                host,
                weight: u32::try_from(weight).unwrap_or(1),
                backup: backup.unwrap_or(false),
                drain: drain.unwrap_or(false),
                max_conns: u32::try_from(max_conns).unwrap_or(0),
            });
        }
        if !specs.is_empty() && specs.iter().all(|s| s.backup) {
            self.report(
                servers_span.clone(),
                format!(
                    "upstream {name:?} has only backup servers: at least one must be a primary"
                ),
            );
        }
        let max_idle_per_server =
            self.usize_at_least(keepalive, "keepalive", 0, defaults::KEEPALIVE);
        let UpstreamTimeoutsSection {
            connect,
            response_header,
            read,
            write,
            idle,
            tunnel_idle,
        } = timeouts.unwrap_or_default();
        let g = globals.upstream;
        let timeouts = UpstreamTimeouts {
            connect: self.duration(connect, g.connect),
            response_header: self.duration(response_header, g.response_header),
            read: self.duration(read, g.read),
            write: self.duration(write, g.write),
            idle: self.duration(idle, g.idle),
            tunnel_idle: self.duration(tunnel_idle, g.tunnel_idle),
        };
        let protocol_span = protocol.as_ref().map(|p| p.span());
        let protocol = match &protocol {
            None => UpstreamProtocol::Http1,
            Some(p) => match p.get_ref().as_str() {
                "http1" => UpstreamProtocol::Http1,
                "h2c" => UpstreamProtocol::H2c,
                "h2" => UpstreamProtocol::H2,
                other => {
                    let message = format!(
                        "unknown protocol {other:?}: expected \"http1\", \"h2c\" or \"h2\""
                    );
                    self.report(p.span(), message);
                    UpstreamProtocol::Http1
                }
            },
        };
        let algorithm = self.algorithm(&name, balance, hash_key);
        let sticky_cookie = sticky_cookie.and_then(|c| {
            let ok = values::cookie_name(c.get_ref());
            self.check(c.span(), ok)
                .map(|()| c.into_inner().into_boxed_str())
        });
        let balance = BalanceSettings {
            algorithm,
            sticky_cookie,
            slow_start: slow_start
                .and_then(|v| self.check(v.span(), values::duration(v.get_ref())))
                .unwrap_or(Duration::ZERO),
            panic_threshold: panic_threshold
                .and_then(|p| self.int_in(&p, "panic_threshold", 0..=100))
                .map_or(0.0, |p| p as f64 / 100.0),
        };
        let queue = QueueSettings {
            max_pending: max_pending
                .and_then(|m| self.int_in(&m, "max_pending", 0..=i64::from(u32::MAX)))
                .map_or(defaults::MAX_PENDING, |m| u32::try_from(m).unwrap_or(0)),
            timeout: self.duration(queue_timeout, defaults::QUEUE_TIMEOUT),
        };
        let health_check = health_check.map(|h| self.health_check(h));
        let outlier = self.outlier(outlier.unwrap_or_default());
        let retry = self.retry(retry.unwrap_or_default(), &timeouts);
        let protocol_span = protocol_span.unwrap_or_else(|| servers_span.clone());
        let tls = match (protocol, tls) {
            // HTTP/2 over TLS: TLS whether or not the table says more about it.
            (UpstreamProtocol::H2, None) => self.upstream_tls(
                Spanned::new(protocol_span, UpstreamTlsValue::Enabled(true)),
                protocol,
            ),
            (UpstreamProtocol::H2, Some(t))
                if matches!(t.get_ref(), UpstreamTlsValue::Enabled(false)) =>
            {
                self.report(
                    t.span(),
                    "protocol = \"h2\" is HTTP/2 over TLS; for cleartext HTTP/2 use protocol = \"h2c\"",
                );
                None
            }
            (UpstreamProtocol::H2c, Some(t))
                if !matches!(t.get_ref(), UpstreamTlsValue::Enabled(false)) =>
            {
                self.report(
                    t.span(),
                    "protocol = \"h2c\" is cleartext HTTP/2; for HTTP/2 over TLS use protocol = \"h2\"",
                );
                None
            }
            (_, t) => t.and_then(|t| self.upstream_tls(t, protocol)),
        };
        Upstream {
            targets: ArcSwap::from_pointee(Targets::empty(&balance.algorithm)),
            name,
            specs,
            balance,
            health_check,
            outlier,
            retry,
            queue,
            timeouts,
            max_idle_per_server,
            tls,
            protocol,
            metrics: Arc::default(),
            live: UpstreamLive::default(),
        }
    }

    /// Reads the CA and client certificate files now, so that `check` names a bad one.
    fn upstream_tls(
        &mut self,
        tls: Spanned<UpstreamTlsValue>,
        protocol: UpstreamProtocol,
    ) -> Option<Arc<UpstreamTls>> {
        let span = tls.span();
        let section = match tls.into_inner() {
            UpstreamTlsValue::Enabled(false) => return None,
            UpstreamTlsValue::Enabled(true) => UpstreamTlsSection::default(),
            UpstreamTlsValue::Table(t) => t,
        };
        let UpstreamTlsSection {
            verify,
            ca,
            server_name,
            client_cert,
            client_key,
        } = section;
        let verify = verify.unwrap_or(true);
        if let (false, Some(ca)) = (verify, &ca) {
            self.report(
                ca.span(),
                "tls.ca has no effect with verify = false: certificates are not checked",
            );
        }
        match (&client_cert, &client_key) {
            (Some(c), None) => self.report(c.span(), "tls.client_cert needs tls.client_key"),
            (None, Some(k)) => self.report(k.span(), "tls.client_key needs tls.client_cert"),
            _ => {}
        }
        let files = TlsFiles {
            verify,
            ca: ca.as_ref().map(|c| self.file_path(c.get_ref())),
            server_name: server_name.as_ref().map(|n| n.get_ref().clone()),
            client_cert: client_cert.as_ref().map(|c| self.file_path(c.get_ref())),
            client_key: client_key.as_ref().map(|k| self.file_path(k.get_ref())),
        };
        let alpn: &[&[u8]] = match protocol {
            UpstreamProtocol::H2 => &[b"h2"],
            UpstreamProtocol::Http1 | UpstreamProtocol::H2c => &[b"http/1.1"],
        };
        match crate::upstream::tls::build(&files, alpn) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                // Point at the value the problem is in.
                let at = match &e {
                    SetupError::BadServerName(_) => server_name.map(|n| n.span()),
                    SetupError::Ca(_) | SetupError::BadCa { .. } => ca.map(|c| c.span()),
                    SetupError::ClientCertFile(_) => client_cert.map(|c| c.span()),
                    SetupError::ClientKeyFile(_) | SetupError::ClientCert { .. } => {
                        client_key.map(|k| k.span())
                    }
                    SetupError::Config(_) | SetupError::NoSystemRoots(_) => None,
                };
                self.report(at.unwrap_or(span), e.to_string());
                None
            }
        }
    }

    fn algorithm(
        &mut self,
        upstream: &str,
        balance: Option<Spanned<String>>,
        hash_key: Option<Spanned<String>>,
    ) -> Algorithm {
        let algorithm = match &balance {
            None => Algorithm::RoundRobin,
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Algorithm::RoundRobin,
                "random" => Algorithm::Random,
                "least_requests" => Algorithm::LeastRequests,
                "peak_ewma" => Algorithm::PeakEwma,
                "consistent_hash" => {
                    let Some(key) = &hash_key else {
                        let message = format!(
                            "upstream {upstream:?}: consistent_hash needs `hash_key`, such as \"client_ip\", \"path\", \"header:X-User\" or \"cookie:session\""
                        );
                        self.report(b.span(), message);
                        return Algorithm::RoundRobin;
                    };
                    let key = self
                        .check(key.span(), values::hash_key(key.get_ref()))
                        .unwrap_or(HashKey::ClientIp);
                    return Algorithm::ConsistentHash(key);
                }
                other => {
                    let message = format!(
                        "unknown balance {other:?}: expected \"round_robin\", \"random\", \"least_requests\", \"peak_ewma\" or \"consistent_hash\""
                    );
                    self.report(b.span(), message);
                    Algorithm::RoundRobin
                }
            },
        };
        if let Some(key) = hash_key {
            self.report(
                key.span(),
                "hash_key only applies with balance = \"consistent_hash\"",
            );
        }
        algorithm
    }

    fn health_check(&mut self, h: Spanned<HealthCheckSection>) -> HealthCheckSettings {
        let span = h.span();
        let HealthCheckSection {
            kind,
            path,
            host,
            expect,
            interval,
            timeout,
            rise,
            fall,
        } = h.into_inner();
        let tcp = match &kind {
            None => false,
            Some(k) => match k.get_ref().as_str() {
                "http" => false,
                "tcp" => true,
                other => {
                    let message = format!(
                        "unknown health_check.type {other:?}: expected \"http\" or \"tcp\""
                    );
                    self.report(k.span(), message);
                    false
                }
            },
        };
        let interval = self.duration(interval, defaults::CHECK_INTERVAL);
        let timeout = self.duration(timeout, defaults::CHECK_TIMEOUT.min(interval));
        let mut count = |v: Option<Spanned<i64>>, what: &str, default: u32| {
            v.and_then(|v| self.int_in(&v, what, 1..=100))
                .map_or(default, |n| u32::try_from(n).unwrap_or(default))
        };
        let rise = count(rise, "health_check.rise", defaults::CHECK_RISE);
        let fall = count(fall, "health_check.fall", defaults::CHECK_FALL);
        let kind = if tcp {
            for (key, present) in [
                ("path", path.as_ref().map(|p| p.span())),
                ("host", host.as_ref().map(|h| h.span())),
                ("expect", expect.as_ref().map(|e| e.span())),
            ] {
                if let Some(at) = present {
                    let message = format!("health_check.{key} has no effect with type = \"tcp\"");
                    self.report(at, message);
                }
            }
            HealthCheckKind::Tcp
        } else {
            let path = match path {
                Some(p) => {
                    self.check(p.span(), values::path(p.get_ref()));
                    p.into_inner()
                }
                None => "/".to_owned(),
            };
            let host = host.and_then(|h| {
                let checked = values::host(h.get_ref()).and_then(|m| match m {
                    HostMatch::Exact(name) => Ok(name.into_string()),
                    HostMatch::Suffix(_) => Err("health_check.host must be a plain name".into()),
                });
                self.check(h.span(), checked)
            });
            let expect = match expect {
                None => StatusSet(vec![(200, 399)]),
                Some(list) if list.get_ref().is_empty() => {
                    self.report(
                        list.span(),
                        "health_check.expect is empty: list at least one status",
                    );
                    StatusSet(vec![(200, 399)])
                }
                Some(list) => StatusSet(
                    list.into_inner()
                        .into_iter()
                        .filter_map(|v| {
                            // A 1xx is interim: the check waits for the final status.
                            let range = values::status_range(v.get_ref()).and_then(|r| {
                                if r.0 < 200 {
                                    Err("health_check.expect takes final statuses, 200 to 599"
                                        .into())
                                } else {
                                    Ok(r)
                                }
                            });
                            self.check(v.span(), range)
                        })
                        .collect(),
                ),
            };
            HealthCheckKind::Http { path, host, expect }
        };
        if timeout > interval {
            self.report(
                span,
                "health_check.timeout must not be longer than its interval",
            );
        }
        HealthCheckSettings {
            kind,
            interval,
            timeout,
            rise,
            fall,
        }
    }

    fn outlier(&mut self, o: OutlierSection) -> OutlierSettings {
        let OutlierSection {
            consecutive_failures,
            count_5xx,
            base_ejection,
            max_ejection,
        } = o;
        let base_ejection = self.duration(base_ejection, defaults::BASE_EJECTION);
        let max_span = max_ejection.as_ref().map(|m| m.span());
        let max_ejection = self.duration(max_ejection, defaults::MAX_EJECTION.max(base_ejection));
        if let Some(span) = max_span.filter(|_| max_ejection < base_ejection) {
            self.report(span, "outlier.max_ejection must be at least base_ejection");
        }
        OutlierSettings {
            consecutive_failures: consecutive_failures
                .and_then(|c| self.int_in(&c, "outlier.consecutive_failures", 0..=10_000))
                .map_or(defaults::CONSECUTIVE_FAILURES, |c| {
                    u32::try_from(c).unwrap_or(defaults::CONSECUTIVE_FAILURES)
                }),
            count_5xx: count_5xx.unwrap_or(true),
            base_ejection,
            max_ejection,
        }
    }

    fn retry(&mut self, r: RetrySection, timeouts: &UpstreamTimeouts) -> RetrySettings {
        let RetrySection {
            attempts,
            per_try_timeout,
            budget,
            min_per_second,
        } = r;
        let per_try_span = per_try_timeout.as_ref().map(|p| p.span());
        let per_try_timeout =
            per_try_timeout.and_then(|p| self.check(p.span(), values::duration(p.get_ref())));
        if let (Some(t), Some(span)) = (per_try_timeout, per_try_span) {
            if t > timeouts.response_header {
                let message = format!(
                    "retry.per_try_timeout ({t:?}) is longer than the response_header timeout ({:?}), which would end the request first",
                    timeouts.response_header
                );
                self.report(span, message);
            }
        }
        RetrySettings {
            attempts: attempts
                .and_then(|a| self.int_in(&a, "retry.attempts", 1..=10))
                .map_or(defaults::ATTEMPTS, |a| {
                    u32::try_from(a).unwrap_or(defaults::ATTEMPTS)
                }),
            per_try_timeout,
            budget_ratio: budget
                .and_then(|b| self.int_in(&b, "retry.budget", 0..=100))
                .map_or(defaults::RETRY_BUDGET, |b| b as f64 / 100.0),
            budget_min_per_second: min_per_second
                .and_then(|m| self.int_in(&m, "retry.min_per_second", 0..=1_000_000))
                .map_or(defaults::RETRY_MIN_PER_SECOND, |m| {
                    u32::try_from(m).unwrap_or(defaults::RETRY_MIN_PER_SECOND)
                }),
        }
    }
}
