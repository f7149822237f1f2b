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

#[derive(Debug)]
pub struct SmoothWeighted {
    cycle: Box<[u32]>,
    next: AtomicUsize,
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

    /// The next server index that `c` says is eligible. STUB: the helper rewrites this.
    pub fn pick_eligible(&self, c: &dyn super::Candidates) -> Option<usize> {
        for _ in 0..self.cycle.len().min(64) {
            let i = self.pick()?;
            if c.eligible(i) {
                return Some(i);
            }
        }
        (0..c.len()).find(|&i| c.eligible(i))
    }

    /// Number of picks in one full cycle (the sum of the weights).
    pub fn cycle_len(&self) -> usize {
        self.cycle.len()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn huge_weights_are_scaled_not_dropped() {
        let b = SmoothWeighted::new(&[u32::MAX, 1]);
        assert!(b.cycle_len() <= MAX_CYCLE + 1);
        assert!(take(&b, b.cycle_len()).contains(&1));
    }
}
