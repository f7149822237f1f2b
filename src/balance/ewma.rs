//! Peak-EWMA latency, the estimate linkerd's balancer ranks servers by.
//!
//! A plain moving average lags behind a server that suddenly slows down, which is exactly when a
//! balancer must react. The peak variant jumps to any sample above the current estimate at once
//! and only decays back down gradually, so a single slow response is felt immediately and a
//! recovery is trusted only after fast responses keep coming. The estimate also decays while no
//! sample arrives, so a server that was avoided for being slow gets probed again later.
//!
//! One change from linkerd's: a sample always moves the estimate at least `MIN_SAMPLE_WEIGHT`
//! of the way. With decay by time alone, a server taking thousands of requests a second sees
//! each fast sample weigh almost nothing, so one slow response early on would rank it last for
//! the whole decay time while the others take its share; measured at 0.2 ms responses, two
//! equally fast servers split traffic 2:1 for that reason. With the floor, a slow sample is
//! forgiven after some tens of fast ones or after `DECAY`, whichever comes first.
//!
//! Lock-free: the estimate and its timestamp are two atomics. Two racing updates can lose one
//! sample, which only costs a little precision in an estimate that is approximate anyway.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How fast old samples stop counting: after `DECAY` a sample weighs 1/e of its first weight.
const DECAY: Duration = Duration::from_secs(10);

/// The least share of the way from the estimate to a lower sample that one sample moves it.
const MIN_SAMPLE_WEIGHT: f64 = 0.05;

/// The estimate of a server nothing is known about yet, in seconds. Low enough that a new
/// server gets tried, so that its first real sample replaces this guess.
const DEFAULT_RTT: f64 = 0.001;

#[derive(Debug)]
pub struct PeakEwma {
    /// The estimate in seconds, as `f64` bits; `u64::MAX` means no sample yet.
    estimate: AtomicU64,
    /// When `estimate` was last updated, in nanoseconds on the caller's clock.
    stamp: AtomicU64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            estimate: AtomicU64::new(u64::MAX),
            stamp: AtomicU64::new(0),
        }
    }
}

impl PeakEwma {
    /// Adds one sample `rtt` taken at `now_ns`.
    pub fn observe(&self, rtt: Duration, now_ns: u64) {
        let sample = rtt.as_secs_f64();
        let bits = self.estimate.load(Relaxed);
        let next = if bits == u64::MAX {
            sample
        } else {
            let current = self.decayed(f64::from_bits(bits), now_ns);
            if sample > current {
                sample
            } else {
                let w = self.weight(now_ns).min(1.0 - MIN_SAMPLE_WEIGHT);
                current * w + sample * (1.0 - w)
            }
        };
        self.estimate.store(next.to_bits(), Relaxed);
        self.stamp.store(now_ns, Relaxed);
    }

    /// The estimate at `now_ns`, in seconds, decayed for the time since the last sample.
    pub fn estimate(&self, now_ns: u64) -> f64 {
        match self.estimate.load(Relaxed) {
            u64::MAX => DEFAULT_RTT,
            bits => self.decayed(f64::from_bits(bits), now_ns),
        }
    }

    /// Whether any sample was taken yet.
    pub fn has_samples(&self) -> bool {
        self.estimate.load(Relaxed) != u64::MAX
    }

    /// How much the old estimate still weighs against a sample taken at `now_ns`.
    fn weight(&self, now_ns: u64) -> f64 {
        let elapsed = now_ns.saturating_sub(self.stamp.load(Relaxed)) as f64;
        (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    fn decayed(&self, value: f64, now_ns: u64) -> f64 {
        value * self.weight(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn unknown_server_gets_the_default() {
        let e = PeakEwma::default();
        assert!(!e.has_samples());
        assert_eq!(e.estimate(5 * MS), DEFAULT_RTT);
    }

    #[test]
    fn a_slow_sample_counts_at_once_and_fast_ones_bring_it_down_gradually() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(10), MS);
        e.observe(Duration::from_millis(500), 2 * MS);
        assert!(
            (e.estimate(2 * MS) - 0.5).abs() < 1e-6,
            "peak taken at once"
        );
        // Ten fast samples 100 ms apart: still well above 10 ms, but falling.
        let mut last = e.estimate(2 * MS);
        for i in 1..=10 {
            let now = 2 * MS + i * 100 * MS;
            e.observe(Duration::from_millis(10), now);
            let now_estimate = e.estimate(now);
            assert!(now_estimate < last, "sample {i}: {now_estimate} >= {last}");
            last = now_estimate;
        }
        assert!(last > 0.1, "a recovery is trusted gradually: {last}");
    }

    #[test]
    fn fast_samples_in_quick_succession_still_bring_a_peak_down() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(50), MS);
        // 200 samples of 0.2 ms, 10 µs apart: 2 ms in all, nothing by the clock.
        for i in 0..200 {
            e.observe(Duration::from_micros(200), MS + i * 10_000);
        }
        let now = e.estimate(MS + 2 * MS);
        assert!(now < 0.001, "{now}");
    }

    #[test]
    fn the_estimate_decays_without_samples() {
        let e = PeakEwma::default();
        e.observe(Duration::from_secs(1), 0);
        let later = e.estimate(10_000 * MS);
        assert!((later - (-1.0f64).exp()).abs() < 1e-3, "{later}");
    }
}
