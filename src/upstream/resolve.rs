//! DNS for servers given by name: resolved at start, then again whenever their records' TTL runs
//! out, so that an upstream follows a name that moves without a reload (nginx's `resolve`).
//!
//! Neighbours: `app.rs` builds one `Resolver` from `[resolver]`, awaits `refresh` once per
//! upstream that has names (so the first requests find them), then spawns `run`;
//! `config/compile.rs` puts only the fixed `IP:port` servers in the first `Targets`, and the
//! names join here; `targets.rs` builds each new list, reusing server states and pooled
//! connections by key, so an address that stays keeps both.
//!
//! Why: nginx OSS resolves a name once, at start, unless a server says `resolve`; an upstream whose
//! name moves (a redeployed service, a scaled pool, a failover) would then need a reload to follow
//! it. Here every name follows its DNS answers.
//!
//! DNS failures never take servers away: a name whose lookup fails (timeout, SERVFAIL, NXDOMAIN,
//! an empty answer) keeps the addresses it had, and is tried again soon (`retry_delay`). Only an
//! answer with records replaces a name's addresses, so a DNS outage leaves the upstream as it was
//! rather than with no servers.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, TokioResolver};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::snapshot::{ResolverSettings, ServerHost, ServerSpec, Targets, Upstream};
use crate::metrics::Metrics;

/// Resolves server names for every upstream, and remembers each name's last good addresses so
/// that a failed lookup can keep them.
pub struct Resolver {
    /// `Err`: the resolver could not be built; every lookup then fails with this reason (and the
    /// names keep whatever addresses they have, which at start is none).
    dns: Result<TokioResolver, Arc<str>>,
    /// Consulted before DNS, as the C library does with `files` before `dns`; empty when
    /// `[resolver]` names its own name servers.
    hosts: Arc<Hosts>,
    timeout: Duration,
    min_ttl: Duration,
    max_ttl: Duration,
    /// By lower-cased host name, shared by every upstream that uses the name.
    names: Mutex<HashMap<String, NameState>>,
}

/// What is known of one name between lookups.
#[derive(Debug, Clone)]
struct NameState {
    /// The last good addresses, sorted.
    addrs: Vec<IpAddr>,
    /// When the name should be looked up again.
    due: Instant,
    /// Whether the last lookup failed: failures are warned about once, when they begin.
    failing: bool,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("ready", &self.dns.is_ok())
            .field("timeout", &self.timeout)
            .field("min_ttl", &self.min_ttl)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(settings: &ResolverSettings) -> Resolver {
        let provider = TokioRuntimeProvider::default();
        let (mut builder, hosts) = if settings.nameservers.is_empty() {
            let builder = match TokioResolver::builder_tokio() {
                Ok(builder) => builder,
                Err(error) => {
                    // Without resolv.conf, names in the hosts file (localhost among them) still
                    // resolve; every other name fails, and says why.
                    tracing::warn!(
                        %error,
                        "cannot read the system's DNS configuration; only the hosts file will answer"
                    );
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                        provider,
                    )
                }
            };
            let hosts = Hosts::from_system().unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot read the hosts file");
                Hosts::default()
            });
            (builder, hosts)
        } else {
            // Exactly the configured servers, as nginx's `resolver` does: no search list, no
            // hosts file. TCP is there for answers too large for UDP.
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            let builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            );
            (builder, Hosts::default())
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = settings.timeout;
        // Hickory reads the hosts file too, but consults it per record type: a name the file
        // lists for IPv4 only would still have its AAAA query sent to DNS. `lookup_host` asks the
        // file first, for both types, instead.
        options.use_hosts_file = ResolveHosts::Never;
        // Hickory's cache must never hand back an answer older than our own schedule would: a
        // positive answer is held at most `max_ttl`, when we ask again anyway, and a negative one
        // not at all, so that a retry after NXDOMAIN really asks.
        options.positive_max_ttl = Some(settings.max_ttl);
        options.negative_max_ttl = Some(Duration::ZERO);
        let dns = builder
            .build()
            .map_err(|error| Arc::<str>::from(format!("cannot build the DNS resolver: {error}")));
        if let Err(error) = &dns {
            tracing::error!(%error, "servers given by name will not resolve");
        }
        Resolver {
            dns,
            hosts: Arc::new(hosts),
            timeout: settings.timeout,
            min_ttl: settings.min_ttl,
            max_ttl: settings.max_ttl,
            names: Mutex::new(HashMap::new()),
        }
    }

    /// How soon to look again after a failure: soon, since DNS hiccups are usually short and the
    /// name's addresses may be moving, but not in a tight loop against a struggling server. At
    /// least a second (or `min_ttl`, if longer), at most five seconds, and never past `max_ttl`,
    /// the operator's bound on how stale a name may get.
    fn retry_delay(&self) -> Duration {
        self.min_ttl
            .max(Duration::from_secs(1))
            .min(Duration::from_secs(5))
            .min(self.max_ttl)
    }

    /// The delay for an answer valid until `valid_until`.
    fn ttl_delay(&self, valid_until: Instant, now: Instant) -> Duration {
        clamp_ttl(
            valid_until.saturating_duration_since(now),
            self.min_ttl,
            self.max_ttl,
        )
    }

    /// How long until the first of `hosts` is due; zero when one was never looked up.
    fn next_due(&self, hosts: &[String]) -> Duration {
        let now = Instant::now();
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .iter()
            .map(|h| {
                names
                    .get(h)
                    .map_or(Duration::ZERO, |s| s.due.saturating_duration_since(now))
            })
            .min()
            .unwrap_or(self.max_ttl)
    }

    /// Looks up every host at once; the answers come back in the order of `hosts`.
    async fn lookup_all(&self, hosts: &[String]) -> Vec<HostAnswer> {
        let mut tasks = JoinSet::new();
        for (i, host) in hosts.iter().enumerate() {
            let (dns, hosts_file, host, timeout) = (
                self.dns.clone(),
                Arc::clone(&self.hosts),
                host.clone(),
                self.timeout,
            );
            tasks.spawn(async move { (i, lookup_host(dns, &hosts_file, &host, timeout).await) });
        }
        let mut answers: Vec<HostAnswer> = hosts
            .iter()
            .map(|_| HostAnswer::failed("the lookup task ended early"))
            .collect();
        while let Some(joined) = tasks.join_next().await {
            if let Ok((i, answer)) = joined {
                if let Some(slot) = answers.get_mut(i) {
                    *slot = answer;
                }
            }
        }
        answers
    }

    /// Folds `answer` into what is known of `host`; returns the host's addresses now and when to
    /// look again.
    fn record(&self, upstream: &str, host: &str, answer: HostAnswer) -> (Vec<IpAddr>, Duration) {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = names.get(host).cloned();
        let merged = merge(
            previous.as_ref().map(|p| p.addrs.as_slice()),
            answer,
            |valid_until| self.ttl_delay(valid_until, now),
            self.retry_delay(),
        );
        let was_failing = previous.as_ref().is_some_and(|p| p.failing);
        match &merged.problem {
            Some(problem) if !was_failing => tracing::warn!(
                upstream = %upstream,
                host = %host,
                error = %problem,
                kept = ?merged.addrs,
                retry_in = ?merged.delay,
                "DNS lookup failed; keeping the name's last known addresses"
            ),
            Some(problem) => {
                tracing::debug!(upstream = %upstream, host = %host, error = %problem, "DNS lookup still failing")
            }
            None if was_failing => {
                tracing::info!(upstream = %upstream, host = %host, addrs = ?merged.addrs, "DNS lookup works again")
            }
            None => {}
        }
        names.insert(
            host.to_owned(),
            NameState {
                addrs: merged.addrs.clone(),
                due: now + merged.delay,
                failing: merged.problem.is_some(),
            },
        );
        (merged.addrs, merged.delay)
    }
}

/// Resolves every name of `upstream` once and swaps in the new server list if it changed;
/// returns how long until the names should be resolved again.
pub async fn refresh(upstream: &Upstream, resolver: &Resolver, registry: &Metrics) -> Duration {
    let hosts = host_names(&upstream.specs);
    if hosts.is_empty() {
        return resolver.max_ttl;
    }
    let answers = resolver.lookup_all(&hosts).await;
    let mut delay = resolver.max_ttl.max(resolver.min_ttl);
    let mut by_host: HashMap<String, Vec<IpAddr>> = HashMap::with_capacity(hosts.len());
    for (host, answer) in hosts.into_iter().zip(answers) {
        let (addrs, next) = resolver.record(&upstream.name, &host, answer);
        delay = delay.min(next);
        by_host.insert(host, addrs);
    }
    let resolved = combine(&upstream.specs, |host| {
        by_host
            .get(&host.to_ascii_lowercase())
            .map_or(&[][..], Vec::as_slice)
    });
    let current = upstream.targets.load();
    if !same_servers(&current, &resolved) {
        let before: HashSet<SocketAddr> = current.servers.iter().map(|s| s.address).collect();
        let after: HashSet<SocketAddr> = resolved.iter().map(|(a, _)| *a).collect();
        let mut added: Vec<SocketAddr> = after.difference(&before).copied().collect();
        let mut removed: Vec<SocketAddr> = before.difference(&after).copied().collect();
        added.sort_unstable();
        removed.sort_unstable();
        tracing::info!(
            upstream = %upstream.name,
            ?added,
            ?removed,
            servers = resolved.len(),
            "DNS answers changed the server list"
        );
        let targets = Targets::build(
            &upstream.name,
            &upstream.balance.algorithm,
            &resolved,
            registry,
        );
        upstream.targets.store(Arc::new(targets));
    }
    delay
}

/// Keeps `upstream`'s names resolved until `stop`.
pub async fn run(
    upstream: Arc<Upstream>,
    resolver: Arc<Resolver>,
    registry: Arc<Metrics>,
    stop: CancellationToken,
) {
    // The start-up `refresh` already looked; wait out what it learned rather than asking again.
    let mut delay = resolver.next_due(&host_names(&upstream.specs));
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        // A lookup can take the whole `timeout`; shutdown must not wait for it.
        delay = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            next = refresh(&upstream, &resolver, &registry) => next,
        };
    }
}

/// The distinct host names among `specs`, lower-cased (DNS names are case-insensitive, and one
/// lookup serves every port of a name).
fn host_names(specs: &[ServerSpec]) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    for spec in specs {
        if let ServerHost::Name { host, .. } = &spec.host {
            let host = host.to_ascii_lowercase();
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
    }
    hosts
}

/// The server list in spec order: fixed addresses as given, names as `addrs_of` says. An
/// address that two entries yield appears once, with the first entry's settings: the pool and
/// the server state are keyed by address, so two entries for one address could not be told apart.
fn combine<'a, 'h>(
    specs: &'a [ServerSpec],
    addrs_of: impl Fn(&str) -> &'h [IpAddr],
) -> Vec<(SocketAddr, &'a ServerSpec)> {
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut resolved = Vec::with_capacity(specs.len());
    for spec in specs {
        match &spec.host {
            ServerHost::Addr(addr) => {
                if seen.insert(*addr) {
                    resolved.push((*addr, spec));
                }
            }
            ServerHost::Name { host, port } => {
                for ip in addrs_of(host) {
                    let addr = SocketAddr::new(*ip, *port);
                    if seen.insert(addr) {
                        resolved.push((addr, spec));
                    }
                }
            }
        }
    }
    resolved
}

/// Whether `Targets::build(resolved)` would give the servers `current` already has, in the same
/// order and with the same settings: then nothing is rebuilt, and the balancers keep their place.
fn same_servers(current: &Targets, resolved: &[(SocketAddr, &ServerSpec)]) -> bool {
    if current.servers.len() != resolved.len() {
        return false;
    }
    // `Targets::build` puts the primaries first, each tier in the given order.
    let ordered = resolved
        .iter()
        .filter(|(_, s)| !s.backup)
        .chain(resolved.iter().filter(|(_, s)| s.backup));
    current
        .servers
        .iter()
        .zip(ordered)
        .all(|(server, (addr, spec))| {
            let max_conns = if spec.max_conns == 0 {
                u32::MAX
            } else {
                spec.max_conns
            };
            server.address == *addr
                && server.weight == spec.weight
                && server.backup == spec.backup
                && server.drain == spec.drain
                && server.max_conns == max_conns
        })
}

/// `ttl` within `[min, max]`; `min` wins should the two cross, so a name is never looked up more
/// often than `min_ttl` allows.
fn clamp_ttl(ttl: Duration, min: Duration, max: Duration) -> Duration {
    ttl.min(max).max(min)
}

/// The outcome of one family's query for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Family {
    /// Records, good until the instant.
    Records(Vec<IpAddr>, Instant),
    /// The server said there are none: the name does not exist (NXDOMAIN), or has no records
    /// of this type.
    Empty { nxdomain: bool },
    /// No usable answer: timeout, SERVFAIL, refused, unreachable...
    Failed(String),
}

/// The A and AAAA outcomes for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostAnswer {
    v4: Family,
    v6: Family,
}

impl HostAnswer {
    fn failed(why: &str) -> HostAnswer {
        HostAnswer {
            v4: Family::Failed(why.to_owned()),
            v6: Family::Failed(why.to_owned()),
        }
    }
}

/// A name's addresses after a lookup, when to look again, and what went wrong, if anything.
#[derive(Debug, PartialEq, Eq)]
struct Merged {
    addrs: Vec<IpAddr>,
    delay: Duration,
    problem: Option<String>,
}

/// Folds a fresh answer into the previous addresses. Records replace the previous addresses of
/// their family; a family that failed keeps its previous addresses (a name served over both
/// families must not lose half of them because one query timed out). An answer without any
/// record, whether failed or empty, keeps everything: a name that really went away costs a few
/// retries, while dropping servers on a DNS hiccup would cost an outage.
fn merge(
    previous: Option<&[IpAddr]>,
    answer: HostAnswer,
    ttl_delay: impl Fn(Instant) -> Duration,
    retry: Duration,
) -> Merged {
    let previous = previous.unwrap_or(&[]);
    let has_records =
        matches!(answer.v4, Family::Records(..)) || matches!(answer.v6, Family::Records(..));
    if !has_records {
        let problem = match (answer.v4, answer.v6) {
            (Family::Failed(e), _) | (_, Family::Failed(e)) => e,
            (Family::Empty { nxdomain: true }, _) | (_, Family::Empty { nxdomain: true }) => {
                "the name does not exist (NXDOMAIN)".to_owned()
            }
            _ => "no A or AAAA records".to_owned(),
        };
        return Merged {
            addrs: previous.to_vec(),
            delay: retry,
            problem: Some(problem),
        };
    }
    let mut addrs = Vec::new();
    let mut delay: Option<Duration> = None;
    let mut problem = None;
    for (family, is_v6) in [(answer.v4, false), (answer.v6, true)] {
        match family {
            Family::Records(ips, valid_until) => {
                addrs.extend(ips.into_iter().filter(|ip| ip.is_ipv6() == is_v6));
                let d = ttl_delay(valid_until);
                delay = Some(delay.map_or(d, |cur| cur.min(d)));
            }
            Family::Empty { .. } => {}
            Family::Failed(e) => {
                addrs.extend(previous.iter().filter(|ip| ip.is_ipv6() == is_v6));
                delay = Some(delay.map_or(retry, |cur| cur.min(retry)));
                problem = Some(e);
            }
        }
    }
    // Sorted, so that a server that rotates its answers does not look like a change.
    addrs.sort_unstable();
    addrs.dedup();
    Merged {
        addrs,
        delay: delay.unwrap_or(retry),
        problem,
    }
}

/// Looks `host` up in the hosts file, else asks DNS for A and AAAA at once; both within
/// `timeout`, whatever retries and name servers that includes.
async fn lookup_host(
    dns: Result<TokioResolver, Arc<str>>,
    hosts: &Hosts,
    host: &str,
    timeout: Duration,
) -> HostAnswer {
    let name = match Name::from_ascii(host) {
        Ok(name) => name,
        Err(error) => return HostAnswer::failed(&format!("not a DNS name: {error}")),
    };
    if let Some(answer) = from_hosts_file(hosts, &name) {
        return answer;
    }
    let dns = match dns {
        Ok(dns) => dns,
        Err(why) => return HostAnswer::failed(&why),
    };
    let both = async {
        let (v4, v6) = tokio::join!(dns.ipv4_lookup(name.clone()), dns.ipv6_lookup(name.clone()));
        HostAnswer {
            v4: family(v4),
            v6: family(v6),
        }
    };
    match tokio::time::timeout(timeout, both).await {
        Ok(answer) => answer,
        Err(_) => HostAnswer::failed(&format!("no answer within {timeout:?}")),
    }
}

/// A name in the hosts file is answered from it alone, for both families, as the C library does:
/// asking DNS for the family the file lacks would only add a wait (or a failure) for nothing.
fn from_hosts_file(hosts: &Hosts, name: &Name) -> Option<HostAnswer> {
    let v4 = hosts.lookup_static_host(&Query::query(name.clone(), RecordType::A));
    let v6 = hosts.lookup_static_host(&Query::query(name.clone(), RecordType::AAAA));
    if v4.is_none() && v6.is_none() {
        return None;
    }
    let family = |lookup: Option<Lookup>| {
        lookup.map_or(Family::Empty { nxdomain: false }, |l| family(Ok(l)))
    };
    Some(HostAnswer {
        v4: family(v4),
        v6: family(v6),
    })
}

fn family(result: Result<Lookup, NetError>) -> Family {
    match result {
        Ok(lookup) => {
            let ips: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .collect();
            if ips.is_empty() {
                Family::Empty { nxdomain: false }
            } else {
                Family::Records(ips, lookup.valid_until())
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(none))) => Family::Empty {
            nxdomain: none.response_code == ResponseCode::NXDomain,
        },
        Err(error) => Family::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Algorithm;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn spec(host: ServerHost) -> ServerSpec {
        ServerSpec {
            host,
            weight: 1,
            backup: false,
            drain: false,
            max_conns: 0,
        }
    }

    fn name(host: &str, port: u16) -> ServerSpec {
        spec(ServerHost::Name {
            host: host.to_owned(),
            port,
        })
    }

    const RETRY: Duration = Duration::from_secs(2);

    fn merged(previous: &[IpAddr], v4: Family, v6: Family) -> Merged {
        merge(
            Some(previous),
            HostAnswer { v4, v6 },
            |_| Duration::from_secs(30),
            RETRY,
        )
    }

    #[test]
    fn ttl_is_clamped_and_min_wins_a_crossed_range() {
        let s = Duration::from_secs;
        assert_eq!(clamp_ttl(s(0), s(1), s(300)), s(1));
        assert_eq!(clamp_ttl(s(60), s(1), s(300)), s(60));
        assert_eq!(clamp_ttl(s(86_400), s(1), s(300)), s(300));
        assert_eq!(clamp_ttl(s(60), s(600), s(300)), s(600));
    }

    #[test]
    fn retry_delay_is_between_one_and_five_seconds_and_within_max_ttl() {
        let resolver = |min_ms, max_ms| {
            Resolver::new(&ResolverSettings {
                nameservers: vec!["127.0.0.1:9".parse().unwrap()],
                timeout: Duration::from_secs(1),
                min_ttl: Duration::from_millis(min_ms),
                max_ttl: Duration::from_millis(max_ms),
            })
            .retry_delay()
        };
        assert_eq!(resolver(100, 1_000), Duration::from_secs(1));
        assert_eq!(resolver(3_000, 300_000), Duration::from_secs(3));
        assert_eq!(resolver(60_000, 300_000), Duration::from_secs(5));
        assert_eq!(resolver(100, 500), Duration::from_millis(500));
    }

    #[test]
    fn an_address_from_two_entries_appears_once_with_the_first_entry() {
        let fixed: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut backup = name("b.test", 80);
        backup.backup = true;
        let specs = vec![
            name("a.test", 80),
            spec(ServerHost::Addr(fixed)),
            backup,
            name("a.test", 81),
        ];
        let a = [ip("10.0.0.1"), ip("10.0.0.2")];
        let b = [ip("10.0.0.2"), ip("10.0.0.3")];
        let resolved = combine(&specs, |host| match host {
            "a.test" => &a[..],
            "b.test" => &b[..],
            _ => &[][..],
        });
        let got: Vec<(String, bool)> = resolved
            .iter()
            .map(|(addr, s)| (addr.to_string(), s.backup))
            .collect();
        let want = [
            ("10.0.0.1:80", false),
            ("10.0.0.2:80", false),
            ("10.0.0.3:80", true),
            ("10.0.0.1:81", false),
            ("10.0.0.2:81", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(a, b)| (a.to_string(), *b)).collect();
        assert_eq!(got, want);
        // The fixed entry lost 10.0.0.2:80 to the name listed before it.
        assert!(std::ptr::eq(resolved[1].1, &specs[0]));
    }

    #[test]
    fn host_names_are_distinct_and_lower_cased() {
        let specs = vec![
            name("App.Test", 80),
            name("app.test", 81),
            spec(ServerHost::Addr("10.0.0.1:80".parse().unwrap())),
            name("b.test", 80),
        ];
        assert_eq!(host_names(&specs), vec!["app.test", "b.test"]);
    }

    #[test]
    fn records_replace_their_family_and_are_sorted() {
        let now = Instant::now();
        let m = merged(
            &[ip("10.0.0.9"), ip("::9")],
            Family::Records(vec![ip("10.0.0.2"), ip("10.0.0.1")], now),
            Family::Empty { nxdomain: false },
        );
        assert_eq!(m.addrs, vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(m.delay, Duration::from_secs(30));
        assert_eq!(m.problem, None);
    }

    #[test]
    fn a_failed_family_keeps_its_previous_addresses_and_retries_soon() {
        let now = Instant::now();
        let m = merged(
            &[ip("10.0.0.9"), ip("::9")],
            Family::Records(vec![ip("10.0.0.1")], now),
            Family::Failed("timed out".into()),
        );
        assert_eq!(m.addrs, vec![ip("10.0.0.1"), ip("::9")]);
        assert_eq!(m.delay, RETRY);
        assert_eq!(m.problem.as_deref(), Some("timed out"));
    }

    #[test]
    fn an_answer_without_records_keeps_everything() {
        let previous = [ip("10.0.0.1"), ip("10.0.0.2")];
        for (v4, v6) in [
            (
                Family::Empty { nxdomain: true },
                Family::Empty { nxdomain: true },
            ),
            (
                Family::Failed("SERVFAIL".into()),
                Family::Empty { nxdomain: false },
            ),
            (
                Family::Empty { nxdomain: false },
                Family::Failed("refused".into()),
            ),
        ] {
            let m = merged(&previous, v4, v6);
            assert_eq!(m.addrs, previous.to_vec());
            assert_eq!(m.delay, RETRY);
            assert!(m.problem.is_some());
        }
        let first = merge(None, HostAnswer::failed("down"), |_| RETRY, RETRY);
        assert!(first.addrs.is_empty());
    }

    #[test]
    fn same_servers_sees_order_settings_and_tiers() {
        let registry = Metrics::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let primary = name("a.test", 80);
        let mut backup = name("b.test", 80);
        backup.backup = true;
        let mut heavy = name("a.test", 80);
        heavy.weight = 5;
        let list = [(b, &backup), (a, &primary)];
        let targets = Targets::build("u", &Algorithm::RoundRobin, &list, &registry);
        assert!(same_servers(&targets, &list));
        assert!(!same_servers(&targets, &[(a, &primary)]));
        assert!(!same_servers(&targets, &[(b, &backup), (a, &heavy)]));
        assert!(!same_servers(&targets, &[(a, &backup), (b, &primary)]));
    }

    #[test]
    fn the_hosts_file_answers_for_both_families() {
        let mut hosts = Hosts::default();
        hosts.read_hosts_conf(&b"127.0.0.5 app.test\n"[..]).unwrap();
        let answer = from_hosts_file(&hosts, &Name::from_ascii("app.test").unwrap()).unwrap();
        assert!(matches!(&answer.v4, Family::Records(ips, _) if ips == &[ip("127.0.0.5")]));
        assert_eq!(answer.v6, Family::Empty { nxdomain: false });
        assert!(from_hosts_file(&hosts, &Name::from_ascii("other.test").unwrap()).is_none());
    }
}
