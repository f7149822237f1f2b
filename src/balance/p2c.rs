//! Power of two choices. STUB: the helper replaces this file.

use super::Candidates;

pub fn pick(c: &dyn Candidates, cost: fn(&dyn Candidates, usize) -> f64) -> Option<usize> {
    (0..c.len())
        .filter(|&i| c.eligible(i))
        .min_by(|&a, &b| cost(c, a).total_cmp(&cost(c, b)))
}

pub fn least_requests_cost(c: &dyn Candidates, i: usize) -> f64 {
    (f64::from(c.in_flight(i)) + 1.0) / c.weight(i)
}

pub fn peak_ewma_cost(c: &dyn Candidates, i: usize) -> f64 {
    c.latency(i) * (f64::from(c.in_flight(i)) + 1.0) / c.weight(i)
}
