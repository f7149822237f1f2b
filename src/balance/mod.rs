//! Picks a server of an upstream for each request.
//!
//! Neighbours: `proxy.rs` asks the upstream's `Balancer` for a server index among the servers that
//! `upstream::targets` says are eligible right now (up, not ejected, under their connection cap,
//! not already tried for this request), then `upstream/pool.rs` for a connection to it. One file
//! per algorithm; they all see the servers through the small `Candidates` trait, so that each can
//! be unit-tested on plain numbers.

mod ewma;
mod maglev;
mod p2c;
mod random;
mod smooth_weighted;

pub use ewma::PeakEwma;
pub use maglev::Maglev;
pub use random::WeightedRandom;
pub use smooth_weighted::SmoothWeighted;

/// What an algorithm may ask about the servers of one tier (the primaries, or the backups).
/// Indices run from 0 to `len() - 1` in the order the `Balancer` was built with, and `len()` is
/// the number of servers it was built with.
#[allow(
    clippy::len_without_is_empty,
    reason = "a tier is never asked whether it is empty; `len` bounds the indices"
)]
pub trait Candidates {
    fn len(&self) -> usize;
    /// Whether server `i` may take this request now.
    fn eligible(&self, i: usize) -> bool;
    /// Server `i`'s weight, scaled down while it ramps up after a recovery (slow start): > 0,
    /// never above the configured weight, and exactly it at full weight (the random and
    /// round-robin fast paths rely on that).
    fn weight(&self, i: usize) -> f64;
    /// Requests in flight to server `i`.
    fn in_flight(&self, i: usize) -> u32;
    /// Server `i`'s peak-EWMA latency estimate in seconds (`PeakEwma::estimate`).
    fn latency(&self, i: usize) -> f64;
}

/// The `balance` setting of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Algorithm {
    /// Smooth weighted round-robin (nginx's order); the default.
    RoundRobin,
    /// Weighted random.
    Random,
    /// Power of two choices: of two random eligible servers, the one with fewer requests in
    /// flight per unit of weight.
    LeastRequests,
    /// Power of two choices on peak-EWMA latency times load (linkerd's algorithm).
    PeakEwma,
    /// Maglev consistent hashing on a key taken from the request.
    ConsistentHash(HashKey),
}

/// What a consistent-hash upstream hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    /// A request header, by lower-cased name.
    Header(Box<str>),
    /// A cookie, by name.
    Cookie(Box<str>),
}

/// One tier's algorithm with whatever it precomputed for the tier's servers.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(SmoothWeighted),
    Random(WeightedRandom),
    LeastRequests,
    PeakEwma,
    ConsistentHash(Maglev),
}

impl Balancer {
    /// Builds the balancer for one tier. `servers[i]` is server `i`'s stable identity (its
    /// address as text; consistent hashing places servers by it, so that adding or removing one
    /// moves only that server's keys) and its configured weight.
    pub fn new(algorithm: &Algorithm, servers: &[(&str, u32)]) -> Balancer {
        let weights: Vec<u32> = servers.iter().map(|&(_, w)| w).collect();
        match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin(SmoothWeighted::new(&weights)),
            Algorithm::Random => Balancer::Random(WeightedRandom::new(&weights)),
            Algorithm::LeastRequests => Balancer::LeastRequests,
            Algorithm::PeakEwma => Balancer::PeakEwma,
            Algorithm::ConsistentHash(_) => Balancer::ConsistentHash(Maglev::new(servers)),
        }
    }

    /// An eligible server, or `None` when `c` has none. `hash` is the request's key hash for
    /// consistent hashing (`None`: the request lacks the key, so any eligible server will do).
    pub fn pick(&self, c: &dyn Candidates, hash: Option<u64>) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick_eligible(c),
            Balancer::Random(r) => r.pick(c),
            Balancer::LeastRequests => p2c::pick(c, p2c::least_requests_cost),
            Balancer::PeakEwma => p2c::pick(c, p2c::peak_ewma_cost),
            Balancer::ConsistentHash(m) => match hash {
                Some(h) => m.pick(c, h),
                None => random::pick_weighted_scan(c),
            },
        }
    }
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finaliser for avalanche): the same bytes give
/// the same value in every process and every version, so a fleet of Gatehouse nodes maps each
/// key to the same server, and a sticky cookie set by one node is understood by the others.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
