//! Bounded keep-alive load for the operations tests (reloads, binary upgrades, drains): a few
//! clients send `GET` back to back on their own connection pools while the test changes
//! something under them, and every answer is checked and every failure sorted by what the
//! connection did (refused, reset, other).
//!
//! Bounded twice, so that a stuck proxy fails the test instead of hanging it: each client stops
//! after `MAX_PER_CLIENT` requests or `LOAD_LIMIT`, whichever comes first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{client_with_timeout, poll_until};

/// The most requests one client sends.
pub const MAX_PER_CLIENT: usize = 250_000;
/// The longest the load runs.
pub const LOAD_LIMIT: Duration = Duration::from_secs(240);
/// How many failures are kept as text, for the report.
const EXAMPLES: usize = 5;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    /// 200 answers, by body.
    pub bodies: BTreeMap<String, usize>,
    /// Connect refused.
    pub refused: usize,
    /// Reset, broken pipe, or closed before the response was complete.
    pub reset: usize,
    /// Anything else: a status other than 200, a timeout, an unexpected body.
    pub other: usize,
    /// 200 with a body not in the accepted set (also counted in `other`).
    pub bad_body: usize,
    /// The first few failures, as text.
    pub examples: Vec<String>,
}

impl Tally {
    pub fn failed(&self) -> usize {
        self.refused + self.reset + self.other
    }

    /// How many 200 answers had this body.
    pub fn count(&self, body: &str) -> usize {
        self.bodies.get(body).copied().unwrap_or_default()
    }

    fn add(&mut self, other: Tally) {
        self.sent += other.sent;
        for (body, n) in other.bodies {
            *self.bodies.entry(body).or_default() += n;
        }
        self.refused += other.refused;
        self.reset += other.reset;
        self.other += other.other;
        self.bad_body += other.bad_body;
        for e in other.examples {
            if self.examples.len() < EXAMPLES {
                self.examples.push(e);
            }
        }
    }

    fn fail(&mut self, kind: Failure, what: String) {
        match kind {
            Failure::Refused => self.refused += 1,
            Failure::Reset => self.reset += 1,
            Failure::Other => self.other += 1,
        }
        if self.examples.len() < EXAMPLES {
            self.examples.push(what);
        }
    }

    /// The figure line the operations docs are made of (`bench/operations.sh` greps for it):
    /// `operations | WHAT | PROXY | sent=N | failed=N | refused=N | reset=N | ...extra`.
    pub fn figure(&self, what: &str, proxy: &str, extra: &str) -> String {
        let mut line = format!(
            "operations | {what} | {proxy} | sent={} | failed={} | refused={} | reset={} | other={} | bad_body={}",
            self.sent,
            self.failed(),
            self.refused,
            self.reset,
            self.other,
            self.bad_body
        );
        if !extra.is_empty() {
            line.push_str(" | ");
            line.push_str(extra);
        }
        line
    }
}

enum Failure {
    Refused,
    Reset,
    Other,
}

/// Sorts a client error by what the connection did, from the error's chain of causes.
fn classify(e: &reqwest::Error) -> Failure {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return Failure::Reset;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            match io.kind() {
                ErrorKind::ConnectionRefused => return Failure::Refused,
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => return Failure::Reset,
                _ => {}
            }
        }
        cause = c.source();
    }
    Failure::Other
}

/// The full chain of an error's causes, for the examples.
fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `clients` tasks sending keep-alive requests until `stop`.
pub struct Load {
    done: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
    started: Instant,
}

impl Load {
    /// Starts the clients on `url`; a 200 whose body is not in `accepted` is a failure.
    pub fn start(url: &str, clients: usize, accepted: &'static [&'static str]) -> Load {
        let done = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (done, sent, url) = (Arc::clone(&done), Arc::clone(&sent), url.to_owned());
            tasks.push(tokio::spawn(async move {
                let client = client_with_timeout(Duration::from_secs(10));
                let deadline = Instant::now() + LOAD_LIMIT;
                let mut t = Tally::default();
                for _ in 0..MAX_PER_CLIENT {
                    if done.load(SeqCst) || Instant::now() >= deadline {
                        break;
                    }
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => match r.text().await {
                            Ok(body) if accepted.contains(&body.as_str()) => {
                                *t.bodies.entry(body).or_default() += 1;
                            }
                            Ok(body) => {
                                t.bad_body += 1;
                                t.fail(Failure::Other, format!("body {body:?}"));
                            }
                            Err(e) => {
                                t.fail(classify(&e), format!("reading the body: {}", chain(&e)))
                            }
                        },
                        Ok(r) => t.fail(Failure::Other, format!("status {}", r.status())),
                        Err(e) => t.fail(classify(&e), chain(&e)),
                    }
                    t.sent += 1;
                    sent.fetch_add(1, SeqCst);
                }
                t
            }));
        }
        Load {
            done,
            sent,
            tasks,
            started: Instant::now(),
        }
    }

    /// Requests answered (or failed) so far.
    pub fn sent(&self) -> usize {
        self.sent.load(SeqCst)
    }

    /// Waits until `n` more requests went through; false if the load stalled for 20 s.
    pub async fn let_through(&self, n: usize) -> bool {
        let seen = self.sent();
        poll_until(Duration::from_secs(20), || async {
            (self.sent() >= seen + n).then_some(())
        })
        .await
        .is_some()
    }

    /// Stops the clients: what they saw, and for how long the load ran.
    pub async fn stop(self) -> (Tally, Duration) {
        self.done.store(true, SeqCst);
        let mut total = Tally::default();
        for t in self.tasks {
            let tally = super::within("a load client to stop", t).await;
            total.add(tally.expect("a load client panicked"));
        }
        (total, self.started.elapsed())
    }
}
