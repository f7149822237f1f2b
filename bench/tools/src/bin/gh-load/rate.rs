//! `gh-load rate`: open-loop, fixed-rate latency measurement.
//!
//! Request i is due at `start + i/rate`. A timer task puts each ticket in a
//! shared queue at its due time; one task per keep-alive connection takes the
//! next ticket, sends, reads the whole response. Latency runs from the ticket's
//! *intended* time to the response's last byte, so time spent queued behind a
//! stalled server is counted (no coordinated omission).
//!
//! Single-threaded on purpose: it runs pinned to one core beside the backend.
//! The schedule uses a timerfd because tokio's timer wheel has 1 ms resolution,
//! which at 5,000 req/s would release tickets in bursts of 5 and add up to a
//! millisecond of the generator's own lateness to every latency.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::http::{build_request, parse_url, Reader};
use crate::parse_duration;

#[derive(clap::Args)]
pub struct Args {
    /// Target, e.g. http://127.0.0.1:8080/ (loopback only).
    #[arg(long)]
    url: String,
    /// Requests per second (the schedule, not a cap).
    #[arg(long)]
    rate: f64,
    /// Measured duration (after warmup), e.g. 10s.
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Unrecorded lead-in at the same rate.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Keep-alive connections, each carrying one request at a time.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Host header (default: host[:port] from the URL).
    #[arg(long)]
    host: Option<String>,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the schedule ends, how long to wait for outstanding responses;
    /// whatever is still unanswered then counts as an error.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    drain: Duration,
}

#[derive(Clone, Copy)]
struct Ticket {
    index: u64,
    intended: Instant,
}

#[derive(Default)]
struct Counts {
    sent: u64,
    ok: u64,
    errors_io: u64,
    errors_status: u64,
    late: u64,
    connects: u64,
}

struct Shared {
    queue: RefCell<VecDeque<Ticket>>,
    /// Wakes idle connection tasks when tickets arrive or the schedule ends.
    notify: Notify,
    done: Cell<bool>,
    /// Tickets with a smaller index are warmup: sent, not recorded.
    warmup_n: u64,
    counts: RefCell<Counts>,
    hist: RefCell<Histogram<u64>>,
    /// How late tickets were released versus their intended time (ns): the
    /// generator's own timing error, reported so a run can be trusted or not.
    timer_lag: RefCell<Histogram<u64>>,
    first_error: RefCell<Option<String>>,
}

/// Highest recordable latency (ns); larger values are clamped, not dropped.
const HIST_MAX_NS: u64 = 600_000_000_000;

/// tokio's AsyncFd wants AsRawFd; nix's TimerFd only offers AsFd.
struct Tfd(TimerFd);
impl AsRawFd for Tfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

fn intended(start: Instant, index: u64, rate: f64) -> Instant {
    start + Duration::from_nanos((index as f64 * 1e9 / rate) as u64)
}

/// Issues tickets on schedule. Bounded: exactly `total` tickets, then returns.
async fn schedule(
    sh: Rc<Shared>,
    start: Instant,
    total: u64,
    rate: f64,
    max_backlog: usize,
) -> io::Result<()> {
    // `AsyncFd::new` is deprecated because a generic T might hand tokio a
    // different or closed fd later; `Tfd` owns its timerfd for the AsyncFd's
    // whole life and always returns the same one, so the safe constructor is
    // sound here (the replacement, `register`, is `unsafe`, which we forbid).
    #[allow(deprecated)]
    let tfd = AsyncFd::new(Tfd(TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?))?;
    let mut i = 0u64;
    while i < total {
        let now = Instant::now();
        while i < total {
            let t = intended(start, i, rate);
            if t > now {
                break;
            }
            if i >= sh.warmup_n {
                let lag = now.saturating_duration_since(t).as_nanos() as u64;
                sh.timer_lag
                    .borrow_mut()
                    .saturating_record(lag.clamp(1, HIST_MAX_NS));
            }
            let mut q = sh.queue.borrow_mut();
            if q.len() >= max_backlog {
                // More than a second of backlog: the target cannot keep up.
                // Count it and drop it rather than let the queue grow unbounded.
                if i >= sh.warmup_n {
                    sh.counts.borrow_mut().late += 1;
                }
            } else {
                q.push_back(Ticket {
                    index: i,
                    intended: t,
                });
                sh.notify.notify_one();
            }
            i += 1;
        }
        if i >= total {
            break;
        }
        let d = intended(start, i, rate).saturating_duration_since(Instant::now());
        if d.is_zero() {
            continue; // already due; a zero OneShot would disarm the timer
        }
        // Relative one-shot armed after reading the clock: it can fire late by
        // the wakeup latency, never early.
        tfd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(d)),
            TimerSetTimeFlags::empty(),
        )?;
        loop {
            let mut guard = tfd.readable().await?;
            match guard.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(r) => {
                    r?;
                    break;
                }
                Err(_would_block) => continue,
            }
        }
    }
    sh.done.set(true);
    sh.notify.notify_waiters();
    Ok(())
}

async fn next_ticket(sh: &Shared) -> Option<Ticket> {
    loop {
        if let Some(t) = sh.queue.borrow_mut().pop_front() {
            return Some(t);
        }
        if sh.done.get() {
            return None;
        }
        // Single-threaded: nothing can push between the check above and the
        // registration in this first poll, so no wakeup is lost.
        sh.notify.notified().await;
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn conn_task(sh: Rc<Shared>, addr: SocketAddr, req: Rc<[u8]>, mut stream: Option<TcpStream>) {
    let mut rd = Reader::new(16 * 1024);
    while let Some(t) = next_ticket(&sh).await {
        let measured = t.index >= sh.warmup_n;
        let res: io::Result<u16> = async {
            if stream.is_none() {
                stream = Some(connect(addr).await?);
                sh.counts.borrow_mut().connects += 1;
                rd = Reader::new(16 * 1024);
            }
            let s = stream
                .as_mut()
                .ok_or_else(|| io::Error::other("no stream"))?;
            s.write_all(&req).await?;
            if measured {
                sh.counts.borrow_mut().sent += 1;
            }
            let resp = rd.read_response(s, false).await?;
            if resp.close {
                stream = None;
            }
            Ok(resp.status)
        }
        .await;
        let done = Instant::now();
        if res.is_err() {
            stream = None;
        }
        if !measured {
            continue;
        }
        let mut c = sh.counts.borrow_mut();
        match res {
            Ok(status) if (200..300).contains(&status) => {
                c.ok += 1;
                let ns = done.saturating_duration_since(t.intended).as_nanos() as u64;
                sh.hist
                    .borrow_mut()
                    .saturating_record(ns.clamp(1, HIST_MAX_NS));
            }
            Ok(status) => {
                c.errors_status += 1;
                sh.first_error
                    .borrow_mut()
                    .get_or_insert_with(|| format!("HTTP status {status}"));
            }
            Err(e) => {
                c.errors_io += 1;
                sh.first_error
                    .borrow_mut()
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Percentiles for the CDF: the headline ones plus 100*(1-10^-x) for x in
/// 0..=5 step 0.05, i.e. evenly spaced on a log-tail ("nines") axis.
fn cdf_percentiles() -> Vec<f64> {
    let mut p: Vec<f64> = vec![
        50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
    ];
    for k in 0..=100 {
        let x = k as f64 * 0.05;
        p.push(((100.0 * (1.0 - 10f64.powf(-x))) * 1e4).round() / 1e4);
    }
    p.sort_by(|a, b| a.total_cmp(b));
    p.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
    p
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

pub fn run(a: Args) -> i32 {
    let target = match parse_url(&a.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gh-load rate: {e}");
            return 2;
        }
    };
    if !(a.rate > 0.0 && a.rate <= 2_000_000.0)
        || a.connections == 0
        || a.connections > 50_000
        || a.duration.is_zero()
    {
        eprintln!(
            "gh-load rate: need 0 < --rate <= 2e6, 1 <= --connections <= 50000, --duration > 0"
        );
        return 2;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gh-load rate: runtime: {e}");
            return 1;
        }
    };
    let host = a.host.clone().unwrap_or_else(|| target.host.clone());
    let req: Rc<[u8]> = build_request(&host, &target.path).into();
    let warmup_n = (a.warmup.as_secs_f64() * a.rate).round() as u64;
    let measured_n = (a.duration.as_secs_f64() * a.rate).round() as u64;
    let total = warmup_n + measured_n;
    let max_backlog = (a.rate.ceil() as usize).max(1);
    let hist = match Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("gh-load rate: histogram: {e}");
            return 1;
        }
    };
    let sh = Rc::new(Shared {
        queue: RefCell::new(VecDeque::with_capacity(max_backlog.min(1 << 16))),
        notify: Notify::new(),
        done: Cell::new(false),
        warmup_n,
        counts: RefCell::new(Counts::default()),
        hist: RefCell::new(hist.clone()),
        timer_lag: RefCell::new(hist),
        first_error: RefCell::new(None),
    });

    let local = tokio::task::LocalSet::new();
    let sched_result = local.block_on(&rt, async {
        // Connect everything before the clock starts, so setup is not measured.
        let mut pending = Vec::with_capacity(a.connections);
        for _ in 0..a.connections {
            pending.push(tokio::task::spawn_local(connect(target.addr)));
        }
        let mut streams = Vec::with_capacity(a.connections);
        for p in pending {
            match p.await {
                Ok(Ok(s)) => {
                    sh.counts.borrow_mut().connects += 1;
                    streams.push(Some(s));
                }
                Ok(Err(e)) => {
                    eprintln!("gh-load rate: connect {}: {e}", target.addr);
                    streams.push(None);
                }
                Err(_) => streams.push(None),
            }
        }
        let mut conns = Vec::with_capacity(a.connections);
        for s in streams {
            conns.push(tokio::task::spawn_local(conn_task(
                sh.clone(),
                target.addr,
                req.clone(),
                s,
            )));
        }
        let start = Instant::now();
        let sched = schedule(sh.clone(), start, total, a.rate, max_backlog).await;
        // Bounded drain: answers still missing by then are counted as errors.
        let deadline = tokio::time::Instant::from_std(intended(start, total, a.rate) + a.drain);
        for c in conns {
            if tokio::time::timeout_at(deadline, c).await.is_err() {
                break;
            }
        }
        sched
    });
    drop(local); // cancels any connection task still waiting past the drain

    if let Err(e) = sched_result {
        eprintln!("gh-load rate: timer: {e}");
        return 1;
    }
    let c = sh.counts.borrow();
    let h = sh.hist.borrow();
    let lag = sh.timer_lag.borrow();
    // Measured tickets neither answered, failed nor dropped as late were still
    // queued or in flight at the drain deadline.
    let timeouts = measured_n.saturating_sub(c.ok + c.errors_io + c.errors_status + c.late);
    let errors = c.errors_io + c.errors_status + timeouts;
    let q = |p: f64| us(h.value_at_quantile(p / 100.0));
    let cdf: Vec<serde_json::Value> = if h.is_empty() {
        Vec::new()
    } else {
        cdf_percentiles()
            .into_iter()
            .map(|p| json!([q(p), p]))
            .collect()
    };
    let out = json!({
        "url": a.url,
        "rate": a.rate,
        "duration_s": a.duration.as_secs_f64(),
        "warmup_s": a.warmup.as_secs_f64(),
        "connections": a.connections,
        "scheduled": measured_n,
        "sent": c.sent,
        "ok": c.ok,
        "errors": errors,
        "errors_io": c.errors_io,
        "errors_status": c.errors_status,
        "timeouts": timeouts,
        "late": c.late,
        "connects": c.connects,
        "p50_us": q(50.0),
        "p90_us": q(90.0),
        "p99_us": q(99.0),
        "p999_us": q(99.9),
        "max_us": us(h.max()),
        "mean_us": (h.mean() / 100.0).round() / 10.0,
        "timer_lag_p99_us": us(lag.value_at_quantile(0.99)),
        "timer_lag_max_us": us(lag.max()),
        "cdf": cdf,
        "first_error": *sh.first_error.borrow(),
    });
    let text = match serde_json::to_string(&out) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gh-load rate: json: {e}");
            return 1;
        }
    };
    match &a.json {
        Some(path) => {
            if let Err(e) = std::fs::write(path, text + "\n") {
                eprintln!("gh-load rate: write {}: {e}", path.display());
                return 1;
            }
        }
        None => println!("{text}"),
    }
    eprintln!(
        "rate {}/s {:.1}s x{} conns: sent {} ok {} errors {} late {} | p50 {}us p90 {}us p99 {}us p99.9 {}us max {}us mean {}us | timer lag p99 {}us{}",
        a.rate,
        a.duration.as_secs_f64(),
        a.connections,
        c.sent,
        c.ok,
        errors,
        c.late,
        q(50.0),
        q(90.0),
        q(99.0),
        q(99.9),
        us(h.max()),
        (h.mean() / 100.0).round() / 10.0,
        us(lag.value_at_quantile(0.99)),
        match &*sh.first_error.borrow() {
            Some(e) => format!(" | first error: {e}"),
            None => String::new(),
        }
    );
    if c.ok == 0 {
        1
    } else {
        0
    }
}
