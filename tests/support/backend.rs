//! A backend the test controls while traffic flows: it can answer, fail with a status, slow
//! down, hang (accept and read, never answer), close after reading a request, be killed (listener
//! and every connection closed at once) and be restarted on the same address.
//!
//! Raw HTTP/1.1 over tokio so that every one of those behaviours is exact: a hyper server cannot
//! drop a connection in the middle of a request on cue. It counts requests by method and the
//! most requests it ever had in progress at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the backend does with each request it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with the backend's name as the body.
    Ok,
    /// This status, with the name as the body.
    Status(u16),
    /// Waits, then answers 200.
    Slow(Duration),
    /// Never answers; the connection stays open until the peer or `kill` closes it.
    Hang,
    /// Closes the connection without a byte of response.
    Close,
}

pub struct Backend {
    name: &'static str,
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Mutex<CancellationToken>,
}

struct Inner {
    name: &'static str,
    mode: Mutex<Mode>,
    requests: AtomicUsize,
    posts: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl Backend {
    pub async fn start(name: &'static str) -> Backend {
        let listener = super::reserved_tokio_listener();
        let addr = listener.local_addr().expect("backend address");
        let inner = Arc::new(Inner {
            name,
            mode: Mutex::new(Mode::Ok),
            requests: AtomicUsize::new(0),
            posts: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&inner), stop.clone()));
        Backend {
            name,
            addr,
            inner,
            stop: Mutex::new(stop),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.inner.mode.lock().expect("mode lock") = mode;
    }

    /// Requests read so far, whatever was done with them.
    pub fn requests(&self) -> usize {
        self.inner.requests.load(SeqCst)
    }

    pub fn posts(&self) -> usize {
        self.inner.posts.load(SeqCst)
    }

    /// The most requests this backend ever had in progress at once.
    pub fn max_active(&self) -> usize {
        self.inner.max_active.load(SeqCst)
    }

    /// Waits until `check` holds, for at most `STEP_TIMEOUT`.
    pub async fn wait_until(&self, check: impl Fn(&Backend) -> bool) {
        let seen =
            super::poll_until(super::STEP_TIMEOUT, || async { check(self).then_some(()) }).await;
        assert!(
            seen.is_some(),
            "backend {} never reached the awaited state",
            self.name
        );
    }

    /// Closes the listener and every connection now: clients see refused connects and resets.
    pub fn kill(&self) {
        self.stop.lock().expect("stop lock").cancel();
    }

    /// Listens again on the same address, in the mode it had.
    pub async fn restart(&self) {
        let listener = bind_again(self.addr).await;
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&self.inner), stop.clone()));
        *self.stop.lock().expect("stop lock") = stop;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port was ours a moment ago; a few tries cover the kernel's bookkeeping.
async fn bind_again(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not bind {addr} again");
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let inner = Arc::clone(&inner);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = serve(stream, &inner, &stop) => {}
            }
        });
    }
}

/// Serves requests on one connection until it closes, a mode ends it, or `stop`.
async fn serve(mut stream: TcpStream, inner: &Inner, stop: &CancellationToken) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let Some((head_len, body_len, is_post)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        // `kill` returns before this task has seen the cancellation: a request read after it
        // must not be answered, or a killed server would still serve what was sent to it.
        if stop.is_cancelled() {
            return;
        }
        buf.drain(..head_len + body_len);
        inner.requests.fetch_add(1, SeqCst);
        if is_post {
            inner.posts.fetch_add(1, SeqCst);
        }
        let now = inner.active.fetch_add(1, SeqCst) + 1;
        inner.max_active.fetch_max(now, SeqCst);
        let mode = *inner.mode.lock().expect("mode lock");
        let status = match mode {
            Mode::Ok => 200,
            Mode::Status(s) => s,
            Mode::Slow(d) => {
                tokio::time::sleep(d).await;
                200
            }
            Mode::Hang => {
                inner.active.fetch_sub(1, SeqCst);
                // Keep reading so a close by the peer ends the task.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Mode::Close => {
                inner.active.fetch_sub(1, SeqCst);
                return;
            }
        };
        inner.active.fetch_sub(1, SeqCst);
        // One write: a head and a body in two would meet Nagle's algorithm and the peer's
        // delayed ACK, and every response would take 40 ms.
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{}",
            inner.name.len(),
            inner.name
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one whole request into `buf`; returns its head length, body length and whether it is a
/// POST, or `None` when the connection ends first.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(usize, usize, bool)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0usize);
            let head_len = end + 4;
            while buf.len() < head_len + body_len {
                read_more(stream, buf).await?;
            }
            return Some((head_len, body_len, head.starts_with("post ")));
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}
