//! `gh-load first200`: time from spawning a server to its first HTTP 200.
//!
//! Plain blocking std I/O: one probe at a time, a fresh connection per probe,
//! and no runtime start-up cost inside the measured interval.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::http::parse_url;
use crate::parse_duration;

#[derive(clap::Args)]
pub struct Args {
    /// URL to probe, e.g. http://127.0.0.1:8080/ (loopback only).
    #[arg(long)]
    url: String,
    /// Give up (exit 1) if no 200 arrives within this time.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Pause between probes.
    #[arg(long, value_parser = parse_duration, default_value = "200us")]
    interval: Duration,
    /// Host header (default: host[:port] from the URL).
    #[arg(long)]
    host: Option<String>,
    /// The server command, after `--`.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

/// One probe: new connection, GET, read the status line. `None` = no answer yet.
fn probe(addr: std::net::SocketAddr, req: &[u8], budget: Duration) -> Option<u16> {
    let budget = budget.max(Duration::from_millis(1));
    let mut s = TcpStream::connect_timeout(&addr, budget).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(budget)).ok()?;
    s.write_all(req).ok()?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // Bounded: at most 1 KiB, each read bounded by the read timeout.
    while len < buf.len() {
        let n = s.read(&mut buf[len..]).ok()?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    // "HTTP/1.1 200 ..."
    let line = std::str::from_utf8(&buf[..len]).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// SIGTERM, then wait up to 5 s before falling back to SIGKILL.
fn stop(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn run(a: Args) -> i32 {
    let target = match parse_url(&a.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gh-load first200: {e}");
            return 2;
        }
    };
    let host = a.host.clone().unwrap_or_else(|| target.host.clone());
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: gh-load\r\n\r\n",
        target.path
    );
    let (prog, rest) = match a.cmd.split_first() {
        Some(x) => x,
        None => return 2,
    };
    let t0 = Instant::now();
    let mut child = match Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gh-load first200: cannot spawn {prog}: {e}");
            return 1;
        }
    };
    let deadline = t0 + a.timeout;
    let mut probes = 0u64;
    let mut last_status = None;
    let result = loop {
        let now = Instant::now();
        if now >= deadline {
            break None;
        }
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("gh-load first200: {prog} exited before answering 200 ({status})");
            return 1;
        }
        probes += 1;
        match probe(target.addr, req.as_bytes(), deadline - now) {
            Some(200) => break Some(t0.elapsed()),
            Some(other) => last_status = Some(other),
            None => {}
        }
        std::thread::sleep(a.interval);
    };
    stop(&mut child);
    match result {
        Some(d) => {
            println!("{{\"ms\": {:.3}}}", d.as_secs_f64() * 1e3);
            0
        }
        None => {
            eprintln!(
                "gh-load first200: no 200 from {} within {:?} ({probes} probes, last status {:?})",
                a.url, a.timeout, last_status
            );
            1
        }
    }
}
