//! Smooth weighted round-robin, the order nginx's `ngx_http_upstream_round_robin` produces.
//!
//! nginx recomputes the order under a per-worker lock on every pick. The order only depends on the
//! weights, so we compute one full cycle when the config is compiled and walk it with an atomic
//! counter: a pick is one `fetch_add`, shared by every runtime thread, with no lock. For weights
//! {a: 5, b: 1, c: 1} the cycle is `a a b a c a a`: the heavy server's turns are spread out rather
//! than bunched, which is the point of the "smooth" variant.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Weights are capped in config validation; this caps the cycle (4 bytes an entry).
pub const MAX_CYCLE: usize = 1 << 20;

/// Tickets `pick_eligible` takes before it gives up on the cycle and draws at random.
const TICKETS: usize = 64;

#[derive(Debug)]
pub struct SmoothWeighted {
    cycle: Box<[u32]>,
    next: AtomicUsize,
    /// Configured weights, to tell how far slow start has scaled a server's weight down.
    weights: Box<[u32]>,
}

impl SmoothWeighted {
    /// `weights[i]` is server `i`'s weight; a weight of 0 never gets picked. When the sum of the
    /// weights exceeds `MAX_CYCLE` they are scaled down, keeping every positive weight >= 1.
    pub fn new(weights: &[u32]) -> SmoothWeighted {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let scaled: Vec<i64> = if total > MAX_CYCLE as u64 {
            weights
                .iter()
                .map(|&w| match w {
                    0 => 0,
                    w => (u64::from(w) * MAX_CYCLE as u64 / total).max(1) as i64,
                })
                .collect()
        } else {
            weights.iter().map(|&w| i64::from(w)).collect()
        };
        let total: i64 = scaled.iter().sum();
        let mut current = vec![0i64; scaled.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..scaled.len() {
                current[i] += scaled[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            cycle.push(best as u32);
        }
        SmoothWeighted {
            cycle: cycle.into_boxed_slice(),
            next: AtomicUsize::new(0),
            weights: weights.into(),
        }
    }

    /// The next server index, or `None` when no server has a positive weight.
    pub fn pick(&self) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        // Relaxed: the counter only has to hand out distinct tickets, it orders nothing else.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.cycle[ticket % self.cycle.len()] as usize)
    }

    /// The next server in the cycle that `c` says is eligible, honouring slow start; `None`
    /// only when none is eligible.
    ///
    /// An ineligible server's ticket passes to the next ticket, so the eligible servers keep
    /// their proportions among themselves. A server ramping up in slow start keeps its place in
    /// the cycle but takes its ticket only with probability `current / configured weight`, so
    /// its share follows its current weight without rebuilding the cycle; a server at full
    /// weight takes every ticket, which keeps nginx's exact order when all are healthy. After
    /// `TICKETS` tickets without a taker (most servers down, or all ramping up), one weighted
    /// random draw among the eligible servers decides, with the same proportions.
    pub fn pick_eligible(&self, c: &dyn super::Candidates) -> Option<usize> {
        if !self.cycle.is_empty() {
            for _ in 0..TICKETS {
                let Some(i) = self.pick() else { break };
                if i >= c.len() || !c.eligible(i) {
                    continue;
                }
                let full = self.weights.get(i).map_or(0.0, |&w| f64::from(w));
                let now = c.weight(i);
                if now >= full || fastrand::f64() * full < now {
                    return Some(i);
                }
            }
        }
        super::random::pick_weighted_scan(c)
    }

    /// Number of picks in one full cycle (the sum of the weights).
    pub fn cycle_len(&self) -> usize {
        self.cycle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::random::testing::{assert_near, counts, shares, Servers};
    use super::*;

    fn take(b: &SmoothWeighted, n: usize) -> Vec<usize> {
        (0..n).filter_map(|_| b.pick()).collect()
    }

    #[test]
    fn matches_nginx_order_for_5_1_1() {
        let b = SmoothWeighted::new(&[5, 1, 1]);
        assert_eq!(take(&b, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn proportions_hold_over_many_cycles() {
        let b = SmoothWeighted::new(&[1, 3]);
        let picks = take(&b, 4000);
        let ones = picks.iter().filter(|&&i| i == 1).count();
        assert_eq!(ones, 3000);
    }

    #[test]
    fn zero_weights_are_skipped_and_all_zero_is_none() {
        let b = SmoothWeighted::new(&[0, 2]);
        assert!(take(&b, 10).iter().all(|&i| i == 1));
        assert_eq!(SmoothWeighted::new(&[0, 0]).pick(), None);
        assert_eq!(SmoothWeighted::new(&[]).pick(), None);
    }

    fn take_eligible(b: &SmoothWeighted, c: &Servers, n: usize) -> Vec<usize> {
        (0..n).map(|_| b.pick_eligible(c).unwrap()).collect()
    }

    #[test]
    fn pick_eligible_keeps_nginx_order_when_all_are_healthy() {
        let b = SmoothWeighted::new(&[5, 1, 1]);
        let c = Servers::weighted(&[5.0, 1.0, 1.0]);
        assert_eq!(take_eligible(&b, &c, 14), [0, 0, 1, 0, 2, 0, 0].repeat(2));
    }

    #[test]
    fn pick_eligible_skips_ineligible_and_keeps_the_others_proportions() {
        let b = SmoothWeighted::new(&[5, 1, 1]);
        let c = Servers::weighted(&[5.0, 1.0, 1.0]).without(0);
        // Server 0's five turns pass on to the next ticket, which alternates 1 and 2.
        assert_eq!(take_eligible(&b, &c, 6), vec![1, 2, 1, 2, 1, 2]);

        let b = SmoothWeighted::new(&[1, 2, 3]);
        let c = Servers::weighted(&[1.0, 2.0, 3.0]).without(1);
        let k = counts(3, 40_000, || b.pick_eligible(&c));
        println!("round-robin 1:(2 down):3 -> {:?}", shares(&k));
        assert_eq!(k[1], 0);
        assert_near(shares(&k)[0], 0.25, 0.01, "server 0");
    }

    #[test]
    fn pick_eligible_with_most_servers_down_falls_back_correctly() {
        fastrand::seed(21);
        let b = SmoothWeighted::new(&[1; 200]);
        let mut c = Servers::equal(200);
        c.eligible = (0..200).map(|i| i == 17 || i == 150).collect();
        let k = counts(200, 20_000, || b.pick_eligible(&c));
        assert_eq!(k[17] + k[150], 20_000);
        assert_near(shares(&k)[17], 0.5, 0.02, "server 17");
    }

    #[test]
    fn pick_eligible_honours_slow_start() {
        fastrand::seed(22);
        let b = SmoothWeighted::new(&[2, 2, 2]);
        let mut c = Servers::weighted(&[2.0, 2.0, 2.0]);
        c.weight[0] = 0.5; // ramping at a quarter: 0.5 / 4.5 of the picks
        let s = shares(&counts(3, 45_000, || b.pick_eligible(&c)));
        println!("round-robin, slow start 0.5 vs 2, 2 -> {s:?}");
        assert_near(s[0], 0.5 / 4.5, 0.01, "ramping server");
        assert_near(s[1], 2.0 / 4.5, 0.01, "full server");
    }

    #[test]
    fn pick_eligible_none_when_none_is_eligible() {
        let b = SmoothWeighted::new(&[1, 1]);
        assert_eq!(
            b.pick_eligible(&Servers::equal(2).without(0).without(1)),
            None
        );
        assert_eq!(
            SmoothWeighted::new(&[]).pick_eligible(&Servers::equal(0)),
            None
        );
    }

    #[test]
    fn huge_weights_are_scaled_not_dropped() {
        let b = SmoothWeighted::new(&[u32::MAX, 1]);
        assert!(b.cycle_len() <= MAX_CYCLE + 1);
        assert!(take(&b, b.cycle_len()).contains(&1));
    }
}
