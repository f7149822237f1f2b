//! Power of two choices: of two distinct random eligible servers, the one that costs less.
//!
//! Sending every request to the least loaded server looks best but is not: every node of a fleet
//! (and every runtime thread) sees the same stale load numbers and sends its next burst to the
//! same server, which is then overloaded while the numbers catch up. Picking the better of two
//! random servers keeps most of the benefit of knowing the loads (with n servers the maximum load
//! falls from about log n / log log n for one random choice to about log log n, an exponential
//! improvement) while spreading simultaneous picks over the servers. See Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing" (IEEE TPDS,
//! 2001). The price is that the costliest server never wins a comparison: it only gets requests
//! again when its cost falls below someone else's, which is the behaviour we want from an
//! overloaded or slow server.
//!
//! Two costs: `least_requests_cost` ranks by requests in flight, `peak_ewma_cost` also by
//! latency, as linkerd's balancer does (linkerd2-proxy / tower `PeakEwma`: latency estimate
//! times pending requests plus one). Both divide by the current weight, so a weight-3 server is
//! as attractive with three times the load, and a server ramping up in slow start looks busier
//! than it is.

use super::random::sample_eligible;
use super::Candidates;

/// The cheaper of two distinct random eligible servers (the only one when only one is
/// eligible); `None` when none is. A tie goes to the first drawn, itself a random one of the
/// two, so equal servers share the picks evenly.
pub fn pick(c: &dyn Candidates, cost: fn(&dyn Candidates, usize) -> f64) -> Option<usize> {
    let a = sample_eligible(c, None)?;
    let Some(b) = sample_eligible(c, Some(a)) else {
        return Some(a);
    };
    // A NaN cost compares false and loses to nothing: it keeps `a`, still a valid server.
    if cost(c, b) < cost(c, a) {
        Some(b)
    } else {
        Some(a)
    }
}

/// Requests in flight, plus the one about to be sent, per unit of weight.
pub fn least_requests_cost(c: &dyn Candidates, i: usize) -> f64 {
    (f64::from(c.in_flight(i)) + 1.0) / c.weight(i)
}

/// Expected wait: the latency estimate times the requests that will share the server, per unit
/// of weight. The `+ 1` makes an idle slow server still cost its latency.
pub fn peak_ewma_cost(c: &dyn Candidates, i: usize) -> f64 {
    c.latency(i) * (f64::from(c.in_flight(i)) + 1.0) / c.weight(i)
}

#[cfg(test)]
mod tests {
    use super::super::random::testing::{assert_near, counts, shares, Servers};
    use super::*;

    const PICKS: usize = 40_000;

    #[test]
    fn a_busy_server_gets_far_fewer_picks() {
        fastrand::seed(11);
        let mut c = Servers::equal(4);
        c.in_flight = vec![50, 2, 2, 2];
        let k = counts(4, PICKS, || pick(&c, least_requests_cost));
        println!("least requests, in flight 50/2/2/2 -> {:?}", shares(&k));
        // It loses every comparison it is drawn into.
        assert_eq!(k[0], 0);
        for i in 1..4 {
            assert_near(shares(&k)[i], 1.0 / 3.0, 0.02, "idle server");
        }
    }

    #[test]
    fn equal_loads_spread_over_all_servers() {
        fastrand::seed(12);
        let mut c = Servers::equal(5);
        c.in_flight = vec![3; 5];
        let k = counts(5, PICKS, || pick(&c, least_requests_cost));
        println!("least requests, equal loads -> {:?}", shares(&k));
        for &s in &shares(&k) {
            assert_near(s, 0.2, 0.02, "server");
        }
    }

    #[test]
    fn least_requests_counts_load_per_unit_of_weight() {
        fastrand::seed(13);
        let mut c = Servers::weighted(&[3.0, 1.0]);
        // 5/3 < 2/1: the heavier server is cheaper despite more requests in flight.
        c.in_flight = vec![4, 1];
        assert_eq!(
            counts(2, 1000, || pick(&c, least_requests_cost)),
            vec![1000, 0]
        );
    }

    #[test]
    fn with_load_feedback_the_busy_server_takes_a_small_share() {
        // Load feedback: one request arrives per tick; servers 1 to 3 complete one every third
        // tick, server 0 only every twelfth. Server 0 should queue up and so get less traffic,
        // about its twelfth of the capacity, but not none.
        fastrand::seed(14);
        let mut c = Servers::equal(4);
        let mut k = [0usize; 4];
        for tick in 0..PICKS {
            let i = pick(&c, least_requests_cost).unwrap();
            k[i] += 1;
            c.in_flight[i] += 1;
            for (s, f) in c.in_flight.iter_mut().enumerate() {
                if (s != 0 || tick % 4 == 0) && tick % 3 == 0 {
                    *f = f.saturating_sub(1);
                }
            }
        }
        let s = shares(&k);
        println!("least requests with feedback, one slow drainer -> {s:?}");
        assert!(s[0] > 0.02 && s[0] < 0.2, "slow server share {}", s[0]);
    }

    #[test]
    fn peak_ewma_avoids_a_server_ten_times_slower() {
        fastrand::seed(15);
        let mut c = Servers::equal(4);
        c.latency = vec![0.010, 0.001, 0.001, 0.001];
        c.in_flight = vec![0, 2, 2, 2];
        let k = counts(4, PICKS, || pick(&c, peak_ewma_cost));
        println!("peak EWMA, 10x latency -> {:?}", shares(&k));
        assert!(shares(&k)[0] < 0.05);
        // Load still counts: once the fast ones queue enough, the slow one is the better bet.
        c.in_flight = vec![0, 20, 20, 20];
        let k = counts(4, PICKS, || pick(&c, peak_ewma_cost));
        assert_near(
            shares(&k)[0],
            0.5,
            0.02,
            "idle slow server vs queued fast ones",
        );
    }

    #[test]
    fn only_one_eligible_is_returned_and_none_is_none() {
        fastrand::seed(16);
        let c = Servers::equal(3).without(0).without(2);
        for _ in 0..1000 {
            assert_eq!(pick(&c, least_requests_cost), Some(1));
            assert_eq!(pick(&c, peak_ewma_cost), Some(1));
        }
        let none = c.without(1);
        assert_eq!(pick(&none, least_requests_cost), None);
        assert_eq!(pick(&Servers::equal(0), peak_ewma_cost), None);
    }

    #[test]
    fn ineligible_servers_are_never_picked_even_when_cheapest() {
        fastrand::seed(17);
        let mut c = Servers::equal(4).without(2);
        c.in_flight = vec![5, 5, 0, 5];
        let k = counts(4, PICKS, || pick(&c, least_requests_cost));
        assert_eq!(k[2], 0);
        for i in [0, 1, 3] {
            assert_near(shares(&k)[i], 1.0 / 3.0, 0.02, "eligible server");
        }
    }
}
