//! The retry budget: retries may add at most a set share of load, so that when an upstream is in
//! trouble, retries cannot multiply the traffic that is hurting it (Finagle's and linkerd's
//! retry budgets; Envoy's `retry_budget`).
//!
//! Every first try deposits `ratio` of a retry; a retry withdraws a whole one. The balance is
//! capped, so a long quiet spell does not bank a burst of retries for the next outage. A small
//! allowance per second on top lets a quiet upstream still retry its rare failures.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Deposits are kept in thousandths of a retry, so a ratio of 0.2 is 200 per request.
const ONE: i64 = 1000;

/// The balance never exceeds what this many first tries deposit.
const CAP_REQUESTS: i64 = 1000;

#[derive(Debug, Default)]
pub struct RetryBudget {
    balance: AtomicI64,
    /// The second (`now_ms / 1000`) that `floor_used` counts for.
    second: AtomicU64,
    floor_used: AtomicU32,
}

impl RetryBudget {
    /// A first try was made.
    pub fn deposit(&self, ratio: f64) {
        let amount = (ratio * ONE as f64) as i64;
        if amount <= 0 {
            return;
        }
        let cap = amount.saturating_mul(CAP_REQUESTS);
        // A lost race only lets the balance overshoot the cap by a few deposits.
        if self.balance.fetch_add(amount, Relaxed) + amount > cap {
            self.balance.store(cap, Relaxed);
        }
    }

    /// Asks for one retry at `now_ms`; true when the budget allows it.
    pub fn withdraw(&self, min_per_second: u32, now_ms: u64) -> bool {
        if self.balance.fetch_sub(ONE, Relaxed) >= ONE {
            return true;
        }
        self.balance.fetch_add(ONE, Relaxed);
        let second = now_ms / 1000;
        if self.second.swap(second, Relaxed) != second {
            self.floor_used.store(0, Relaxed);
        }
        self.floor_used.fetch_add(1, Relaxed) < min_per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifth_of_the_first_tries_may_be_retried() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.deposit(0.2);
        }
        let granted = (0..1000).filter(|_| b.withdraw(0, 5_000)).count();
        assert_eq!(granted, 200);
    }

    #[test]
    fn the_per_second_floor_refills_each_second() {
        let b = RetryBudget::default();
        assert_eq!((0..10).filter(|_| b.withdraw(3, 1_000)).count(), 3);
        assert_eq!((0..10).filter(|_| b.withdraw(3, 2_500)).count(), 3);
    }

    #[test]
    fn a_quiet_spell_banks_only_up_to_the_cap() {
        let b = RetryBudget::default();
        for _ in 0..100_000 {
            b.deposit(0.2);
        }
        let granted = (0..100_000).filter(|_| b.withdraw(0, 0)).count();
        assert_eq!(granted, 200);
    }
}
