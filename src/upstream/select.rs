//! Which server takes a request: the tiers, the health filter, the panic threshold, sticky
//! sessions and the connection caps, around the upstream's balancing algorithm.
//!
//! Neighbours: `proxy.rs` calls `select` for each try, with the servers already tried; the
//! algorithms in `balance/` only ever see the servers this module says are eligible.
//!
//! The order of decisions:
//! 1. A sticky cookie naming an available server that is under its cap wins (a draining server
//!    still serves its sticky clients: that is what draining is for).
//! 2. The primaries, without the unhealthy, the ejected, the draining, the full and the tried.
//! 3. If no primary is left for this request (none is available, or each available one was
//!    tried and failed), the backups, filtered the same way.
//! 4. If fewer primaries are healthy than the panic threshold asks (or none is left, and no
//!    backup either), health is ignored and every untried primary may take the request: sending
//!    to servers that may be down beats answering 503 for sure when the checks may be wrong.

use super::state::{now_ns, ServerState};
use super::targets::{Server, Targets};
use crate::balance::Candidates;
use crate::config::snapshot::Upstream;

/// Servers already tried for this request, by index in `Targets::servers`. A request makes a
/// handful of tries at most; servers past the first 64 are never marked, which at worst lets a
/// retry land on the same server again.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried(u64);

impl Tried {
    pub fn add(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1 << i;
        }
    }

    pub fn contains(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }

    pub fn count(self) -> u32 {
        self.0.count_ones()
    }
}

/// Why no server was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoServer {
    /// Servers are available but every one is at its `max_conns`: waiting may help.
    Saturated,
    /// Nothing left to try.
    None,
}

/// What the request brings to the choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request {
    /// The hash of the consistent-hashing key, when the upstream hashes and the request has it.
    pub hash: Option<u64>,
    /// The server id from the sticky cookie, when the upstream is sticky and the request has it.
    pub sticky: Option<u64>,
}

/// Picks a server for one try; the index is into `targets.servers`.
pub fn select(
    upstream: &Upstream,
    targets: &Targets,
    request: Request,
    tried: Tried,
) -> Result<usize, NoServer> {
    let now_ns = now_ns();
    let now_ms = now_ns / 1_000_000;
    if let Some(id) = request.sticky {
        let found = targets.servers.iter().enumerate().find(|(i, s)| {
            s.sticky_id == id
                && !tried.contains(*i)
                && s.state.is_available(now_ms)
                && s.state.in_flight() < s.max_conns
        });
        if let Some((i, _)) = found {
            return Ok(i);
        }
    }

    let (primaries, backups) = targets.servers.split_at(targets.primaries);
    let usable = |s: &Server| s.state.is_available(now_ms) && !s.drain;
    // Health as the checks see it decides on panic mode; what this request already tried
    // decides when it moves on to the backups.
    let healthy = primaries.iter().filter(|s| usable(s)).count();
    let untried = primaries
        .iter()
        .enumerate()
        .filter(|(i, s)| usable(s) && !tried.contains(*i))
        .count();
    let backups_untried = backups
        .iter()
        .enumerate()
        .any(|(i, s)| usable(s) && !tried.contains(i + primaries.len()));
    let tier = |servers, ignore_health| Tier {
        servers,
        offset: if std::ptr::eq(servers, primaries) {
            0
        } else {
            primaries.len()
        },
        tried,
        ignore_health,
        now_ms,
        now_ns,
        slow_start_ms: upstream.balance.slow_start,
    };
    let panic_below = upstream.balance.panic_threshold * primaries.len() as f64;
    let (chosen, balancer) = if untried == 0 && backups_untried {
        (tier(backups, false), &targets.backup)
    } else if untried == 0 || (healthy as f64) < panic_below {
        (tier(primaries, true), &targets.primary)
    } else {
        (tier(primaries, false), &targets.primary)
    };
    match balancer.pick(&chosen, request.hash) {
        Some(i) => Ok(i + chosen.offset),
        None if chosen.any_full() => Err(NoServer::Saturated),
        None => Err(NoServer::None),
    }
}

/// Whether `state` may be ejected now without leaving its tier with fewer available servers than
/// one, or than the panic threshold: ejecting more would only move the upstream into panic mode,
/// where health is ignored anyway, and lose the information of who is really bad.
pub fn may_eject(upstream: &Upstream, targets: &Targets, state: &ServerState) -> bool {
    let now_ms = super::state::now_ms();
    let (primaries, backups) = targets.servers.split_at(targets.primaries);
    let tier = if primaries.iter().any(|s| std::ptr::eq(&*s.state, state)) {
        primaries
    } else {
        backups
    };
    let others = tier
        .iter()
        .filter(|s| !std::ptr::eq(&*s.state, state) && s.state.is_available(now_ms))
        .count();
    let floor = (upstream.balance.panic_threshold * tier.len() as f64)
        .ceil()
        .max(1.0);
    others as f64 >= floor
}

/// One tier as the balancing algorithm sees it.
struct Tier<'a> {
    servers: &'a [Server],
    /// Index of `servers[0]` in `Targets::servers`, for `tried`.
    offset: usize,
    tried: Tried,
    ignore_health: bool,
    now_ms: u64,
    now_ns: u64,
    slow_start_ms: std::time::Duration,
}

impl Tier<'_> {
    /// Whether a server is turned away only by its cap, so that waiting would help.
    fn any_full(&self) -> bool {
        self.servers.iter().enumerate().any(|(i, s)| {
            !self.tried.contains(i + self.offset)
                && !s.drain
                && (self.ignore_health || s.state.is_available(self.now_ms))
                && s.state.in_flight() >= s.max_conns
        })
    }
}

impl Candidates for Tier<'_> {
    fn len(&self) -> usize {
        self.servers.len()
    }

    fn eligible(&self, i: usize) -> bool {
        let s = &self.servers[i];
        !self.tried.contains(i + self.offset)
            && !s.drain
            && (self.ignore_health || s.state.is_available(self.now_ms))
            && s.state.in_flight() < s.max_conns
    }

    fn weight(&self, i: usize) -> f64 {
        let s = &self.servers[i];
        f64::from(s.weight) * s.state.weight_factor(self.now_ms, self.slow_start_ms)
    }

    fn in_flight(&self, i: usize) -> u32 {
        self.servers[i].state.in_flight()
    }

    fn latency(&self, i: usize) -> f64 {
        self.servers[i].state.ewma.estimate(self.now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::Snapshot;
    use crate::metrics::Metrics;

    /// One upstream `a` over `servers` (TOML array items) with `extra` keys.
    fn snapshot(servers: &str, extra: &str) -> Snapshot {
        let text = format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             [upstream.a]\nservers = [{servers}]\n{extra}"
        );
        crate::config::load_str(std::path::Path::new("t.toml"), &text, &Metrics::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn picks(s: &Snapshot, n: usize, request: Request) -> Vec<Result<usize, NoServer>> {
        let u = &s.upstreams[0];
        let t = u.targets.load();
        (0..n)
            .map(|_| select(u, &t, request, Tried::default()))
            .collect()
    }

    fn down(s: &Snapshot, i: usize) {
        let t = s.upstreams[0].targets.load();
        t.servers[i].state.record_check(false, 1, 1);
    }

    const THREE: &str = r#""127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3""#;

    #[test]
    fn down_servers_are_skipped_and_tried_ones_too() {
        let s = snapshot(THREE, "");
        down(&s, 1);
        assert!(picks(&s, 30, Request::default())
            .iter()
            .all(|p| matches!(p, Ok(0 | 2))));
        let u = &s.upstreams[0];
        let t = u.targets.load();
        let mut tried = Tried::default();
        tried.add(0);
        assert_eq!(select(u, &t, Request::default(), tried), Ok(2));
    }

    #[test]
    fn backups_only_when_no_primary_is_left() {
        let s = snapshot(
            r#""127.0.0.1:1", { address = "127.0.0.1:9", backup = true }"#,
            "",
        );
        assert!(picks(&s, 10, Request::default())
            .iter()
            .all(|p| *p == Ok(0)));
        let u = &s.upstreams[0];
        let t = u.targets.load();
        let mut tried = Tried::default();
        tried.add(0);
        assert_eq!(
            select(u, &t, Request::default(), tried),
            Ok(1),
            "primary tried"
        );
        down(&s, 0);
        assert!(picks(&s, 10, Request::default())
            .iter()
            .all(|p| *p == Ok(1)));
        down(&s, 1);
        // Nothing healthy at all: panic mode, the primaries take it.
        assert!(picks(&s, 10, Request::default())
            .iter()
            .all(|p| *p == Ok(0)));
    }

    #[test]
    fn panic_threshold_ignores_health_below_it() {
        let s = snapshot(THREE, "panic_threshold = 50\n");
        down(&s, 0);
        assert!(
            !picks(&s, 30, Request::default()).contains(&Ok(0)),
            "2 of 3 up"
        );
        down(&s, 1);
        let all = picks(&s, 30, Request::default());
        assert!(
            all.contains(&Ok(0)) && all.contains(&Ok(1)),
            "1 of 3 up: {all:?}"
        );
    }

    #[test]
    fn draining_servers_get_only_their_sticky_clients() {
        let s = snapshot(
            r#""127.0.0.1:1", { address = "127.0.0.1:2", drain = true }"#,
            "sticky_cookie = \"GH\"\n",
        );
        assert!(picks(&s, 10, Request::default())
            .iter()
            .all(|p| *p == Ok(0)));
        let id = s.upstreams[0].targets.load().servers[1].sticky_id;
        let sticky = Request {
            sticky: Some(id),
            ..Request::default()
        };
        assert!(picks(&s, 10, sticky).iter().all(|p| *p == Ok(1)));
        down(&s, 1);
        assert!(
            picks(&s, 10, sticky).iter().all(|p| *p == Ok(0)),
            "not when down"
        );
    }

    #[test]
    fn full_servers_saturate_and_ejection_keeps_one_server() {
        let s = snapshot(r#""127.0.0.1:1", "127.0.0.1:2""#, "max_conns = 1\n");
        let u = &s.upstreams[0];
        let t = u.targets.load();
        let _a = t.servers[0].try_begin(&u.live).unwrap();
        assert!(picks(&s, 10, Request::default())
            .iter()
            .all(|p| *p == Ok(1)));
        let _b = t.servers[1].try_begin(&u.live).unwrap();
        assert_eq!(picks(&s, 1, Request::default()), [Err(NoServer::Saturated)]);
        assert!(may_eject(u, &t, &t.servers[0].state));
        down(&s, 1);
        assert!(!may_eject(u, &t, &t.servers[0].state), "the last one stays");
    }

    #[test]
    fn tried_marks_the_first_64() {
        let mut t = Tried::default();
        t.add(0);
        t.add(63);
        t.add(64);
        assert!(t.contains(0) && t.contains(63) && !t.contains(64) && !t.contains(1));
        assert_eq!(t.count(), 2);
    }
}
