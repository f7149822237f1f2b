//! The live state of one upstream server: up or down by its health checks, ejected or not by
//! its recent failures, ramping up after a recovery, and how loaded and how fast it is.
//!
//! Neighbours: `upstream::select` reads it to decide who may take a request; `proxy.rs` moves the
//! in-flight count and records each exchange's outcome; `upstream::health` records check results;
//! `admin.rs` and `metrics.rs` show it. Everything is an atomic, so the request path never locks;
//! the one mutex holds the short list of recent failures, touched only when something failed.
//!
//! States are kept in a registry by the server's stable key (upstream name + address), so a
//! server keeps its state when DNS re-resolution or a reload rebuilds the server list.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::balance::PeakEwma;
use crate::metrics::UpstreamErrorKind;

/// How many failures `/upstreams` lists per server.
const RECENT_FAILURES: usize = 8;

/// Slow start never sends a recovering server less than this share of its weight: at zero it
/// would get no request at all, and so never show that it recovered.
const SLOW_START_FLOOR: f64 = 0.05;

/// Milliseconds and nanoseconds on one monotonic clock that starts with the process; `0` is used
/// as "never" by the fields below, so the clock starts at 1.
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1_000_000
}

/// What passive health (outlier ejection) does with failures; resolved from `[upstream.x.outlier]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive failures that eject a server; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// Whether a 5xx response counts as a failure (connect errors, resets and timeouts always do).
    pub count_5xx: bool,
    /// The first ejection's length; each ejection in a row lasts this much longer.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// Where a server stands, as `/upstreams` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    /// Failed its active health checks `fall` times in a row.
    Unhealthy,
    /// Taken out by passive health for a while.
    Ejected,
    /// `drain = true`: finishes what it has, takes no new requests (sticky sessions aside).
    Draining,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Healthy => "healthy",
            Condition::Unhealthy => "unhealthy",
            Condition::Ejected => "ejected",
            Condition::Draining => "draining",
        }
    }
}

/// One failure, as `/upstreams` lists it.
#[derive(Debug, Clone, Copy)]
pub struct FailureRecord {
    pub at: SystemTime,
    pub what: &'static str,
}

#[derive(Debug)]
pub struct ServerState {
    /// The active health checks' verdict; true until they say otherwise.
    up: AtomicBool,
    /// Consecutive check results: > 0 successes, < 0 failures.
    check_streak: AtomicI32,
    consecutive_failures: AtomicU32,
    /// `now_ms()` until which the server is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Ejections in a row; sets the next ejection's length.
    ejection_streak: AtomicU32,
    /// Since when the server ramps its weight back up (slow start); 0 when it is at full weight.
    recovering_since: AtomicU64,
    in_flight: AtomicU32,
    pub ewma: PeakEwma,
    requests: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
    recent: Mutex<VecDeque<FailureRecord>>,
}

impl Default for ServerState {
    fn default() -> Self {
        ServerState {
            up: AtomicBool::new(true),
            check_streak: AtomicI32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejection_streak: AtomicU32::new(0),
            recovering_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            ewma: PeakEwma::default(),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
        }
    }
}

/// What a health check result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTransition {
    WentDown,
    CameUp,
}

impl ServerState {
    /// Up by its health checks and not ejected: it may take requests.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.up.load(Relaxed) && !self.is_ejected(now_ms)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Relaxed) > now_ms
    }

    /// Milliseconds of ejection left, if ejected.
    pub fn ejected_for(&self, now_ms: u64) -> Option<u64> {
        let until = self.ejected_until.load(Relaxed);
        (until > now_ms).then(|| until - now_ms)
    }

    pub fn condition(&self, now_ms: u64, draining: bool) -> Condition {
        if !self.is_up() {
            Condition::Unhealthy
        } else if self.is_ejected(now_ms) {
            Condition::Ejected
        } else if draining {
            Condition::Draining
        } else {
            Condition::Healthy
        }
    }

    /// The share of its weight the server gets now: ramps linearly from a small floor to 1 over
    /// `slow_start` after it recovered.
    pub fn weight_factor(&self, now_ms: u64, slow_start: Duration) -> f64 {
        let since = self.recovering_since.load(Relaxed);
        if since == 0 || slow_start.is_zero() {
            return 1.0;
        }
        let elapsed = now_ms.saturating_sub(since);
        let total = u64::try_from(slow_start.as_millis()).unwrap_or(u64::MAX);
        if since > now_ms {
            // Still ejected: the ramp starts when the ejection ends.
            return SLOW_START_FLOOR;
        }
        if elapsed >= total {
            // Done ramping; later reads need not compute it again.
            let _ = self
                .recovering_since
                .compare_exchange(since, 0, Relaxed, Relaxed);
            return 1.0;
        }
        (elapsed as f64 / total as f64).max(SLOW_START_FLOOR)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// A request to this server starts, unless `max` are in flight already; `targets::InFlight`
    /// pairs a success with `leave`. A compare-and-swap, so that requests picking the server at
    /// the same moment cannot together pass its cap.
    pub(super) fn try_enter(&self, max: u32) -> bool {
        let entered = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        if entered {
            self.requests.fetch_add(1, Relaxed);
        }
        entered
    }

    pub(super) fn leave(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// An exchange that worked (any response that is not a counted failure), taking `rtt` from
    /// the first byte sent to the response head.
    pub fn record_success(&self, rtt: Duration, now_ns: u64) {
        let now_ms = now_ns / 1_000_000;
        self.ewma.observe(rtt, now_ns);
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
        // Ejections in a row stop counting once the server has worked again for a while after
        // its last one: a server that fails once a day is not punished for last week.
        let streak = self.ejection_streak.load(Relaxed);
        if streak != 0 {
            let until = self.ejected_until.load(Relaxed);
            if now_ms > until.saturating_add(60_000) {
                self.ejection_streak.store(0, Relaxed);
            }
        }
    }

    /// An exchange that failed. Returns true when this failure ejected the server. `may_eject`
    /// is asked only when the failure count reached the threshold: the caller refuses when the
    /// ejection would leave the upstream without a server to send to.
    pub fn record_failure(
        &self,
        what: UpstreamFailure,
        penalty: Duration,
        outlier: &OutlierSettings,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        let now_ms = now_ms();
        self.failures.fetch_add(1, Relaxed);
        // A refused connect is fast; without a penalty a dead server would look like the
        // quickest one to a latency-aware balancer.
        self.ewma.observe(penalty, now_ns());
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back(FailureRecord {
                at: SystemTime::now(),
                what: what.as_str(),
            });
        }
        if outlier.consecutive_failures == 0 || self.is_ejected(now_ms) {
            return false;
        }
        let count = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if count < outlier.consecutive_failures || !may_eject() {
            return false;
        }
        let streak = self.ejection_streak.fetch_add(1, Relaxed) + 1;
        let length = outlier
            .base_ejection
            .saturating_mul(streak)
            .min(outlier.max_ejection);
        let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        let until = now_ms.saturating_add(length_ms);
        self.ejected_until.store(until, Relaxed);
        self.recovering_since.store(until, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        true
    }

    /// One active health check result; `rise` successes in a row bring a down server up, `fall`
    /// failures in a row take an up server down.
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<CheckTransition> {
        let streak = self.check_streak.load(Relaxed);
        let streak = match (ok, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.check_streak.store(streak, Relaxed);
        let up = self.up.load(Relaxed);
        if up && !ok && streak.unsigned_abs() >= fall {
            self.up.store(false, Relaxed);
            return Some(CheckTransition::WentDown);
        }
        if !up && ok && streak.unsigned_abs() >= rise {
            self.up.store(true, Relaxed);
            // If passive health still has it out, the ramp starts when that ejection ends.
            self.recovering_since.fetch_max(now_ms(), Relaxed);
            self.consecutive_failures.store(0, Relaxed);
            return Some(CheckTransition::CameUp);
        }
        None
    }

    pub fn requests_total(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn failures_total(&self) -> u64 {
        self.failures.load(Relaxed)
    }

    pub fn ejections_total(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    pub fn recent_failures(&self) -> Vec<FailureRecord> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().copied().collect()
    }
}

/// Why an exchange counted against a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    Io(UpstreamErrorKind),
    /// The server answered with this 5xx status.
    Status(u16),
}

impl UpstreamFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Io(kind) => kind.as_str(),
            UpstreamFailure::Status(500) => "status_500",
            UpstreamFailure::Status(502) => "status_502",
            UpstreamFailure::Status(503) => "status_503",
            UpstreamFailure::Status(504) => "status_504",
            UpstreamFailure::Status(_) => "status_5xx",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: u32) -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: n,
            count_5xx: true,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
        }
    }

    const FAIL: UpstreamFailure = UpstreamFailure::Io(UpstreamErrorKind::ConnectRefused);

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let s = ServerState::default();
        let o = outlier(3);
        assert!(!s.record_failure(FAIL, Duration::ZERO, &o, || true));
        assert!(!s.record_failure(FAIL, Duration::ZERO, &o, || true));
        s.record_success(Duration::from_millis(1), now_ns());
        assert!(!s.record_failure(FAIL, Duration::ZERO, &o, || true));
        assert!(!s.record_failure(FAIL, Duration::ZERO, &o, || true));
        assert!(s.is_available(now_ms()));
        assert!(s.record_failure(FAIL, Duration::ZERO, &o, || true));
        assert!(!s.is_available(now_ms()));
        let left = s.ejected_for(now_ms()).unwrap();
        assert!(left > 9_000 && left <= 10_000, "{left}");
        assert_eq!(s.ejections_total(), 1);
        assert_eq!(s.recent_failures().len(), 5);
    }

    #[test]
    fn ejection_is_refused_when_the_caller_says_so() {
        let s = ServerState::default();
        let o = outlier(1);
        assert!(!s.record_failure(FAIL, Duration::ZERO, &o, || false));
        assert!(s.is_available(now_ms()));
    }

    #[test]
    fn repeated_ejections_grow_up_to_the_cap() {
        let s = ServerState::default();
        let o = outlier(1);
        let mut lengths = Vec::new();
        for _ in 0..4 {
            // End the previous ejection by hand, as time passing would.
            s.ejected_until.store(0, Relaxed);
            assert!(s.record_failure(FAIL, Duration::ZERO, &o, || true));
            lengths.push(s.ejected_for(now_ms()).unwrap().div_ceil(1000));
        }
        assert_eq!(lengths, vec![10, 20, 25, 25]);
    }

    #[test]
    fn rise_and_fall_need_streaks() {
        let s = ServerState::default();
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(
            s.record_check(true, 2, 3),
            None,
            "a success breaks the streak"
        );
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), Some(CheckTransition::WentDown));
        assert!(!s.is_available(now_ms()));
        assert_eq!(s.record_check(true, 2, 3), None);
        assert_eq!(s.record_check(true, 2, 3), Some(CheckTransition::CameUp));
        assert!(s.is_available(now_ms()));
    }

    #[test]
    fn slow_start_ramps_from_the_floor_to_full_weight() {
        let s = ServerState::default();
        let ramp = Duration::from_secs(10);
        assert_eq!(s.weight_factor(now_ms(), ramp), 1.0);
        let now = now_ms();
        s.recovering_since.store(now, Relaxed);
        assert_eq!(s.weight_factor(now, ramp), SLOW_START_FLOOR);
        assert!((s.weight_factor(now + 5_000, ramp) - 0.5).abs() < 1e-9);
        assert_eq!(s.weight_factor(now + 10_000, ramp), 1.0);
        assert_eq!(
            s.weight_factor(now + 1, ramp),
            1.0,
            "the ramp is over for good"
        );
    }
}
