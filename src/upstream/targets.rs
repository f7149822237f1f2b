//! The servers an upstream sends to right now, and what requests to it share while they run.
//!
//! Neighbours: `config/compile.rs` builds the first `Targets` of each upstream; `upstream::resolve`
//! builds new ones when DNS answers change; `upstream::select` picks from them; the pool and the
//! server states are found through each `Server`, so a rebuilt list keeps both for the addresses
//! that remain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

use super::budget::RetryBudget;
use super::pool::ServerIdle;
use super::state::ServerState;
use crate::balance::{stable_hash, Algorithm, Balancer};
use crate::config::snapshot::{ServerHost, ServerSpec};
use crate::http2::client::ServerConns;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Server {
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub drain: bool,
    /// Most requests in flight at once; `u32::MAX` when unlimited.
    pub max_conns: u32,
    /// Stable across reloads and re-resolution (upstream name + address): the pool and the state
    /// registry are keyed by it.
    pub key: Arc<str>,
    /// What a sticky-session cookie holds for this server: a hash of its address, so that the
    /// cookie neither reveals the address nor changes between Gatehouse nodes.
    pub sticky_id: u64,
    pub state: Arc<ServerState>,
    /// This server's idle connections, looked up by `key` on first use and then held here, so
    /// a request reaches them without a map lookup. Empty in a freshly built list.
    pub idle: OnceLock<Arc<ServerIdle>>,
    /// The name this server was configured by, when it was (the TLS name to verify and send).
    pub host_name: Option<Arc<str>>,
    /// Its HTTP/2 connections, when the upstream speaks h2c; found like `idle`.
    pub h2: OnceLock<Arc<ServerConns>>,
}

impl Server {
    /// Counts a request as in flight to this server until the guard is dropped; `None` when the
    /// server is at its `max_conns`.
    pub fn try_begin<'a>(&'a self, live: &'a UpstreamLive) -> Option<InFlight<'a>> {
        // `then`, not `then_some`: a guard built for a refused entry would run its drop.
        self.state.try_enter(self.max_conns).then(|| InFlight {
            state: &self.state,
            live,
        })
    }

    /// The sticky cookie's value for this server: 16 hex digits.
    pub fn sticky_value(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let hex = b"0123456789abcdef";
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = hex[((self.sticky_id >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

/// The servers in two tiers, primaries first, each with its own balancer.
#[derive(Debug)]
pub struct Targets {
    pub servers: Vec<Server>,
    /// `servers[..primaries]` are the primaries, the rest are backups.
    pub primaries: usize,
    pub primary: Balancer,
    pub backup: Balancer,
}

impl Targets {
    /// Builds the list for `upstream` from resolved addresses, each with the entry it came from.
    /// States come from the registry, so a server that was already known keeps its state.
    pub fn build(
        upstream: &str,
        algorithm: &Algorithm,
        resolved: &[(SocketAddr, &ServerSpec)],
        registry: &Metrics,
    ) -> Targets {
        let mut servers: Vec<Server> = Vec::with_capacity(resolved.len());
        for backup in [false, true] {
            for &(address, spec) in resolved.iter().filter(|(_, s)| s.backup == backup) {
                let key: Arc<str> = format!("{upstream}/{address}").into();
                servers.push(Server {
                    address,
                    weight: spec.weight,
                    backup,
                    drain: spec.drain,
                    max_conns: if spec.max_conns == 0 {
                        u32::MAX
                    } else {
                        spec.max_conns
                    },
                    sticky_id: stable_hash(address.to_string().as_bytes()),
                    state: registry.server_state(&key),
                    key,
                    idle: OnceLock::new(),
                    host_name: match &spec.host {
                        ServerHost::Name { host, .. } => Some(host.as_str().into()),
                        ServerHost::Addr(_) => None,
                    },
                    h2: OnceLock::new(),
                });
            }
        }
        let primaries = servers.iter().filter(|s| !s.backup).count();
        let tier = |list: &[Server]| {
            let names: Vec<String> = list.iter().map(|s| s.address.to_string()).collect();
            let pairs: Vec<(&str, u32)> = names
                .iter()
                .zip(list)
                .map(|(n, s)| (n.as_str(), s.weight))
                .collect();
            Balancer::new(algorithm, &pairs)
        };
        let primary = tier(&servers[..primaries]);
        let backup = tier(&servers[primaries..]);
        Targets {
            servers,
            primaries,
            primary,
            backup,
        }
    }

    pub fn empty(algorithm: &Algorithm) -> Targets {
        Targets {
            servers: Vec::new(),
            primaries: 0,
            primary: Balancer::new(algorithm, &[]),
            backup: Balancer::new(algorithm, &[]),
        }
    }
}

/// What the requests to one upstream share while they run.
#[derive(Debug, Default)]
pub struct UpstreamLive {
    /// Woken whenever a request to any of the upstream's servers ends, for the requests that
    /// wait for a server under its `max_conns`.
    pub released: Notify,
    /// Requests waiting for a server now.
    pub pending: AtomicU32,
    pub budget: RetryBudget,
}

/// A request in flight to a server; dropping it ends the count and wakes the requests waiting
/// for a server under its cap.
#[derive(Debug)]
pub struct InFlight<'a> {
    state: &'a ServerState,
    live: &'a UpstreamLive,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.state.leave();
        // Only a queue makes waking worth its cost; most upstreams never have one.
        if self.live.pending.load(Relaxed) > 0 {
            self.live.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::ServerHost;

    #[test]
    fn in_flight_is_counted_while_the_guard_lives() {
        let registry = Metrics::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let spec = ServerSpec {
            host: ServerHost::Addr(addr),
            weight: 1,
            backup: false,
            drain: false,
            max_conns: 0,
        };
        let targets = Targets::build("u", &Algorithm::RoundRobin, &[(addr, &spec)], &registry);
        let live = UpstreamLive::default();
        let server = &targets.servers[0];
        let a = server.try_begin(&live).unwrap();
        let b = server.try_begin(&live).unwrap();
        assert_eq!(server.state.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(server.state.in_flight(), 0);
        assert_eq!(server.state.requests_total(), 2);
        assert_eq!(server.max_conns, u32::MAX);
        let capped = Targets::build(
            "u",
            &Algorithm::RoundRobin,
            &[(
                addr,
                &ServerSpec {
                    max_conns: 1,
                    ..spec.clone()
                },
            )],
            &registry,
        );
        let one = capped.servers[0].try_begin(&live).unwrap();
        assert!(
            capped.servers[0].try_begin(&live).is_none(),
            "the cap holds"
        );
        assert_eq!(
            capped.servers[0].state.in_flight(),
            1,
            "a refusal changes no count"
        );
        drop(one);
        assert!(capped.servers[0].try_begin(&live).is_some());
        assert_eq!(&*server.key, "u/127.0.0.1:1");
        assert_eq!(server.sticky_value().len(), 16);
    }

    #[test]
    fn backups_come_after_primaries_and_states_are_shared_by_key() {
        let registry = Metrics::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let spec = |backup| ServerSpec {
            host: ServerHost::Addr(a),
            weight: 1,
            backup,
            drain: false,
            max_conns: 3,
        };
        let (backup, primary) = (spec(true), spec(false));
        let t1 = Targets::build(
            "u",
            &Algorithm::RoundRobin,
            &[(a, &backup), (b, &primary)],
            &registry,
        );
        assert_eq!(t1.primaries, 1);
        assert_eq!(t1.servers[0].address, b);
        assert!(t1.servers[1].backup);
        let t2 = Targets::build("u", &Algorithm::RoundRobin, &[(b, &primary)], &registry);
        assert!(Arc::ptr_eq(&t1.servers[0].state, &t2.servers[0].state));
    }
}
