//! Weighted random choice, and the uniform choice among eligible servers that the other
//! algorithms fall back on.
//!
//! Random is the algorithm that needs no shared state at all: every runtime thread draws from
//! its own `fastrand` generator, so a pick never touches a cache line another thread writes.
//! Over many requests each eligible server gets a share proportional to its current weight
//! (`Candidates::weight`, already scaled down by slow start), which is all the guarantee it
//! gives; unlike round-robin it can send a few requests in a row to the same server.
//!
//! The common case is every server eligible at full weight. For it we keep the cumulative
//! configured weights and draw with a binary search, then accept the drawn server with
//! probability `eligible * current weight / configured weight` (rejection sampling). An
//! accepted draw is then exactly proportional to the current weights of the eligible servers,
//! whatever their state, so the fast path is not an approximation: it only gives up after a few
//! rejected draws (many servers down or ramping up) and hands over to an exact two-pass scan.
//! Either way a pick is O(n) at worst and allocates nothing.

use super::Candidates;

/// Draws tried before a linear scan. With half the servers ineligible, 8 draws all miss with
/// probability 1/256, so the scan stays rare even in a degraded upstream.
const ATTEMPTS: usize = 8;

#[derive(Debug)]
pub struct WeightedRandom {
    /// Configured weights, the upper bound of `Candidates::weight` (slow start only scales
    /// down), which is what makes rejection sampling against them exact.
    weights: Box<[u32]>,
    /// `cumulative[i]` is the sum of `weights[..=i]`.
    cumulative: Box<[u64]>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> WeightedRandom {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        WeightedRandom {
            weights: weights.into(),
            cumulative,
        }
    }

    /// An eligible server, each with a chance proportional to `c.weight(i)`; `None` only when
    /// none is eligible.
    pub fn pick(&self, c: &dyn Candidates) -> Option<usize> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        // A `c` of another length than the config is a caller bug; the scan still answers
        // correctly for it, the precomputed sums would not.
        if total > 0 && c.len() == self.weights.len() {
            for _ in 0..ATTEMPTS {
                let r = fastrand::u64(0..total);
                // The first index whose running sum exceeds `r`; zero weights are skipped
                // because their running sum equals the previous one. Always `< len` since the
                // last sum is `total > r`.
                let i = self.cumulative.partition_point(|&sum| sum <= r);
                if !c.eligible(i) {
                    continue;
                }
                let full = f64::from(self.weights[i]);
                let now = c.weight(i);
                // At full weight no second draw: the common case costs one random number.
                if now >= full || fastrand::f64() * full < now {
                    return Some(i);
                }
            }
        }
        pick_weighted_scan(c)
    }
}

/// Any eligible server, each equally likely; `None` only when none is eligible.
pub fn pick_uniform(c: &dyn Candidates) -> Option<usize> {
    sample_eligible(c, None)
}

/// A uniformly random eligible server other than `except`. Random indices first (one draw when
/// most servers are eligible), then, when they keep missing, a count of the eligible ones and
/// a walk to a random one of them, so the answer is uniform either way and never allocates.
pub(super) fn sample_eligible(c: &dyn Candidates, except: Option<usize>) -> Option<usize> {
    let n = c.len();
    if n == 0 {
        return None;
    }
    let ok = |i: usize| Some(i) != except && c.eligible(i);
    for _ in 0..ATTEMPTS {
        let i = fastrand::usize(0..n);
        if ok(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|&i| ok(i)).count();
    if count == 0 {
        return None;
    }
    let mut k = fastrand::usize(0..count);
    let mut last = None;
    for i in (0..n).filter(|&i| ok(i)) {
        if k == 0 {
            return Some(i);
        }
        k -= 1;
        last = Some(i);
    }
    // Only reached when eligibility changed between the two passes (it is read from live
    // server state); any server still eligible is a fine answer then.
    last
}

/// Exact weighted choice by two passes: sum the eligible weights, then walk to a random point
/// of that sum. Weights that are not positive finite numbers count as zero; when every eligible
/// server has such a weight, the choice is uniform rather than none at all.
pub(super) fn pick_weighted_scan(c: &dyn Candidates) -> Option<usize> {
    let n = c.len();
    let mut total = 0.0;
    let mut eligible = 0usize;
    for i in 0..n {
        if c.eligible(i) {
            eligible += 1;
            total += usable(c.weight(i));
        }
    }
    if eligible == 0 {
        return None;
    }
    if total <= 0.0 || !total.is_finite() {
        return pick_uniform(c);
    }
    let mut r = fastrand::f64() * total;
    let mut last = None;
    for i in 0..n {
        if !c.eligible(i) {
            continue;
        }
        let w = usable(c.weight(i));
        if w <= 0.0 {
            continue;
        }
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    // Rounding can leave `r` a hair above the last weight; that last server is the right
    // answer then. `None` here means eligibility changed under us; try the uniform choice.
    last.or_else(|| pick_uniform(c))
}

fn usable(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 {
        w
    } else {
        0.0
    }
}

/// A `Candidates` made of plain vectors, shared by the tests of every algorithm.
#[cfg(test)]
pub(super) mod testing {
    use super::Candidates;

    #[derive(Debug, Clone)]
    pub struct Servers {
        pub eligible: Vec<bool>,
        pub weight: Vec<f64>,
        pub in_flight: Vec<u32>,
        pub latency: Vec<f64>,
    }

    impl Servers {
        /// Every server eligible, at the given weights, idle, with 1 ms latency.
        pub fn weighted(weights: &[f64]) -> Servers {
            let n = weights.len();
            Servers {
                eligible: vec![true; n],
                weight: weights.to_vec(),
                in_flight: vec![0; n],
                latency: vec![0.001; n],
            }
        }

        /// `n` eligible servers of weight 1.
        pub fn equal(n: usize) -> Servers {
            Servers::weighted(&vec![1.0; n])
        }

        pub fn without(mut self, i: usize) -> Servers {
            self.eligible[i] = false;
            self
        }
    }

    impl Candidates for Servers {
        fn len(&self) -> usize {
            self.eligible.len()
        }
        fn eligible(&self, i: usize) -> bool {
            self.eligible[i]
        }
        fn weight(&self, i: usize) -> f64 {
            self.weight[i]
        }
        fn in_flight(&self, i: usize) -> u32 {
            self.in_flight[i]
        }
        fn latency(&self, i: usize) -> f64 {
            self.latency[i]
        }
    }

    /// How many of `picks` calls of `pick` went to each of `n` servers; panics on `None`.
    pub fn counts(n: usize, picks: usize, mut pick: impl FnMut() -> Option<usize>) -> Vec<usize> {
        let mut counts = vec![0; n];
        for _ in 0..picks {
            counts[pick().unwrap()] += 1;
        }
        counts
    }

    /// `counts` as fractions of their sum.
    pub fn shares(counts: &[usize]) -> Vec<f64> {
        let total: usize = counts.iter().sum();
        counts.iter().map(|&k| k as f64 / total as f64).collect()
    }

    pub fn assert_near(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: {actual:.4}, expected {expected:.4} ± {tolerance}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_near, counts, shares, Servers};
    use super::*;

    const PICKS: usize = 40_000;

    #[test]
    fn weights_1_to_3_give_a_quarter_and_three_quarters() {
        fastrand::seed(1);
        let r = WeightedRandom::new(&[1, 3]);
        let c = Servers::weighted(&[1.0, 3.0]);
        let s = shares(&counts(2, PICKS, || r.pick(&c)));
        println!("weighted 1:3 -> {s:?}");
        assert_near(s[0], 0.25, 0.02, "server 0");
        assert_near(s[1], 0.75, 0.02, "server 1");
    }

    #[test]
    fn ineligible_servers_are_never_picked_and_the_rest_keep_their_ratio() {
        fastrand::seed(2);
        let r = WeightedRandom::new(&[1, 5, 3]);
        let c = Servers::weighted(&[1.0, 5.0, 3.0]).without(1);
        let k = counts(3, PICKS, || r.pick(&c));
        println!("weighted 1:(5 down):3 -> {:?}", shares(&k));
        assert_eq!(k[1], 0);
        assert_near(shares(&k)[0], 0.25, 0.02, "server 0");
    }

    #[test]
    fn mostly_ineligible_servers_still_give_the_right_ratio() {
        // Only 2 of 40 eligible: the draws mostly miss and the scan decides.
        fastrand::seed(3);
        let mut weights = [1; 40];
        weights[31] = 3;
        let r = WeightedRandom::new(&weights);
        let mut c = Servers::weighted(&weights.map(f64::from));
        c.eligible = vec![false; 40];
        c.eligible[7] = true;
        c.eligible[31] = true;
        let k = counts(40, PICKS, || r.pick(&c));
        assert_eq!(k[7] + k[31], PICKS);
        assert_near(shares(&k)[7], 0.25, 0.02, "server 7");
    }

    #[test]
    fn slow_start_reduces_the_share() {
        fastrand::seed(4);
        let r = WeightedRandom::new(&[2, 2]);
        let mut c = Servers::weighted(&[2.0, 2.0]);
        c.weight[0] = 0.5; // a quarter of its configured weight: 0.5 / 2.5 of the picks
        let s = shares(&counts(2, PICKS, || r.pick(&c)));
        println!("slow start 0.5 vs 2 -> {s:?}");
        assert_near(s[0], 0.2, 0.02, "ramping server");
    }

    #[test]
    fn all_ineligible_or_empty_is_none() {
        let r = WeightedRandom::new(&[1, 1]);
        let c = Servers::equal(2).without(0).without(1);
        assert_eq!(r.pick(&c), None);
        assert_eq!(pick_uniform(&c), None);
        let empty = Servers::equal(0);
        assert_eq!(WeightedRandom::new(&[]).pick(&empty), None);
        assert_eq!(pick_uniform(&empty), None);
    }

    #[test]
    fn uniform_ignores_weights_and_skips_ineligible() {
        fastrand::seed(5);
        let c = Servers::weighted(&[1.0, 10.0, 1.0, 1.0, 1.0]).without(3);
        let k = counts(5, PICKS, || pick_uniform(&c));
        println!("uniform over 4 of 5 -> {:?}", shares(&k));
        assert_eq!(k[3], 0);
        for i in [0, 1, 2, 4] {
            assert_near(shares(&k)[i], 0.25, 0.02, "eligible server");
        }
    }

    #[test]
    fn uniform_is_uniform_when_the_scan_decides() {
        fastrand::seed(6);
        let mut c = Servers::equal(100);
        c.eligible = (0..100).map(|i| i % 25 == 0).collect();
        let k = counts(100, PICKS, || pick_uniform(&c));
        for i in [0, 25, 50, 75] {
            assert_near(shares(&k)[i], 0.25, 0.02, "eligible server");
        }
        assert_eq!(k[0] + k[25] + k[50] + k[75], PICKS);
    }

    #[test]
    fn sample_eligible_never_returns_the_excluded_one() {
        fastrand::seed(7);
        let c = Servers::equal(2);
        for _ in 0..1000 {
            assert_eq!(sample_eligible(&c, Some(0)), Some(1));
        }
        assert_eq!(sample_eligible(&Servers::equal(1), Some(0)), None);
    }

    #[test]
    fn zero_or_broken_weights_fall_back_to_uniform_not_none() {
        fastrand::seed(8);
        let c = Servers::weighted(&[0.0, f64::NAN]);
        let k = counts(2, 1000, || pick_weighted_scan(&c));
        assert!(k[0] > 0 && k[1] > 0);
    }
}
