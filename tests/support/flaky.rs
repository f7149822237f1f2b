//! An upstream whose health the test controls: `GET /healthz` answers with a status the test sets
//! (and logs it), every other request gets 200 with the server's name (and is counted), and
//! `kill` takes the whole server away, connections included.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::http_upstream::text_response;

pub const HEALTH_PATH: &str = "/healthz";

#[derive(Debug, Default)]
struct Seen {
    /// Statuses the next `/healthz` requests get, before `health` applies again.
    script: Mutex<VecDeque<u16>>,
    /// The status of every `/healthz` answer, in order.
    checks: Mutex<Vec<u16>>,
    /// Requests to any other path.
    served: AtomicUsize,
}

/// A hyper HTTP/1.1 server on 127.0.0.1:0. Aborted on drop.
pub struct FlakyUpstream {
    name: &'static str,
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    seen: Arc<Seen>,
    task: Option<JoinHandle<()>>,
}

impl FlakyUpstream {
    /// Starts with `/healthz` answering 200.
    pub async fn start(name: &'static str) -> FlakyUpstream {
        // Killed by its tests: its port must not go to another test's server.
        let listener = super::reserved_tokio_listener();
        let addr = listener.local_addr().expect("flaky upstream address");
        let health = Arc::new(AtomicU16::new(200));
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn(accept_loop(
            listener,
            name,
            Arc::clone(&health),
            Arc::clone(&seen),
        ));
        FlakyUpstream {
            name,
            addr,
            health,
            seen,
            task: Some(task),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `/healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// The next `/healthz` requests get these statuses, one each, in order; then `set_health`'s
    /// status applies again. Decided as each request arrives, so no check is raced.
    pub fn script_health(&self, statuses: &[u16]) {
        lock(&self.seen.script).extend(statuses);
    }

    /// The status of every `/healthz` answer so far, in order.
    pub fn check_answers(&self) -> Vec<u16> {
        lock(&self.seen.checks).clone()
    }

    /// How many `/healthz` answers so far had `status`.
    pub fn checks_answered(&self, status: u16) -> usize {
        self.check_answers()
            .iter()
            .filter(|&&s| s == status)
            .count()
    }

    /// Requests to paths other than `/healthz` so far.
    pub fn served(&self) -> usize {
        self.seen.served.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection; returns once both are done, so that a
    /// connect to `addr` is refused from then on.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The accept loop owns the listener and the connection tasks: once it is dropped,
            // so are they.
            let _ = task.await;
        }
    }
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: &'static str,
    health: Arc<AtomicU16>,
    seen: Arc<Seen>,
) {
    // Dropped with this future on `kill`, which aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Reap the finished ones so a long test does not accumulate them.
        while connections.try_join_next().is_some() {}
        let health = Arc::clone(&health);
        let seen = Arc::clone(&seen);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = if req.uri().path() == HEALTH_PATH {
                    let scripted = lock(&seen.script).pop_front();
                    let status = scripted.unwrap_or_else(|| health.load(Ordering::SeqCst));
                    lock(&seen.checks).push(status);
                    text_response(status, "")
                } else {
                    seen.served.fetch_add(1, Ordering::SeqCst);
                    text_response(200, name)
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
