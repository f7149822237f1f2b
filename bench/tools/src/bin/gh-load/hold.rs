//! `gh-load hold`: open many keep-alive connections, one request each, then
//! hold them idle so the proxy's memory per idle client connection can be read.

use std::io::{self, Write};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::http::{build_request, is_emfile, parse_addr, Reader};
use crate::parse_duration;

#[derive(clap::Args)]
pub struct Args {
    /// Proxy address, e.g. 127.0.0.1:8080 (loopback only).
    #[arg(long)]
    addr: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Path of the one request sent on each connection.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header (default: the --addr value).
    #[arg(long)]
    host: Option<String>,
    /// Upper bound on the hold; it also ends at stdin EOF or SIGTERM/SIGINT.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    hold_for: Duration,
    /// Connections opened concurrently, so the target's listen backlog is not overrun.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Do not end the hold at stdin EOF (for callers whose stdin is /dev/null).
    #[arg(long)]
    ignore_stdin: bool,
}

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect, send one GET, read its whole response; the stream is kept only if
/// the answer was a 2xx the server will keep alive.
async fn open_one(addr: std::net::SocketAddr, req: &[u8]) -> io::Result<TcpStream> {
    let mut s = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    s.write_all(req).await?;
    // Small buffer, dropped once the response is read: our side stays lean too.
    let mut rd = Reader::new(4096);
    let resp = tokio::time::timeout(STEP_TIMEOUT, rd.read_response(&mut s, false))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response timed out"))??;
    if !(200..300).contains(&resp.status) {
        return Err(io::Error::other(format!("HTTP status {}", resp.status)));
    }
    if resp.close {
        return Err(io::Error::other(
            "server closed the connection after the response",
        ));
    }
    Ok(s)
}

/// Lifts the soft open-files limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

pub fn run(a: Args) -> i32 {
    let addr = match parse_addr(&a.addr, 80) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("gh-load hold: {e}");
            return 2;
        }
    };
    if a.connections == 0 || a.connections > 200_000 || a.batch == 0 {
        eprintln!("gh-load hold: need 1 <= --connections <= 200000 and --batch >= 1");
        return 2;
    }
    let limit = raise_nofile();
    if limit != 0 && (limit as usize) < a.connections + 32 {
        eprintln!(
            "gh-load hold: open-files limit is {limit}, below {} connections: raise `ulimit -n` (hard limit) first",
            a.connections
        );
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gh-load hold: runtime: {e}");
            return 1;
        }
    };
    let host = a.host.clone().unwrap_or_else(|| a.addr.clone());
    let req: std::sync::Arc<[u8]> = build_request(&host, &a.path).into();
    rt.block_on(async move {
        let mut held: Vec<TcpStream> = Vec::with_capacity(a.connections);
        let mut failed = 0usize;
        let mut emfile = false;
        let mut first_error: Option<String> = None;
        let mut remaining = a.connections;
        while remaining > 0 && !emfile {
            let n = remaining.min(a.batch);
            remaining -= n;
            let mut set = JoinSet::new();
            for _ in 0..n {
                let req = req.clone();
                set.spawn(async move { open_one(addr, &req).await });
            }
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(s)) => held.push(s),
                    Ok(Err(e)) => {
                        failed += 1;
                        emfile |= is_emfile(&e);
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        // Connections never attempted because we ran out of descriptors count as failed.
        failed += remaining;
        if emfile {
            eprintln!(
                "gh-load hold: EMFILE/ENFILE (too many open files) after {} connections: raise `ulimit -n` (limit now {limit})",
                held.len()
            );
        }
        if let Some(e) = &first_error {
            eprintln!("gh-load hold: {failed} failed; first error: {e}");
        }
        println!("ready {} {}", held.len(), failed);
        let _ = io::stdout().flush();

        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            eprintln!("gh-load hold: cannot install signal handlers");
            return 1;
        };
        let stdin_eof = async {
            if a.ignore_stdin {
                std::future::pending::<()>().await;
            }
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 512];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(a.hold_for) => {}
            _ = stdin_eof => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Which connections did the target drop while we held them? A closed
        // one reads EOF; an open idle one would block.
        let mut closed = 0usize;
        let mut buf = [0u8; 64];
        for s in &held {
            match s.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => closed += 1,
            }
        }
        eprintln!("gh-load hold: held {}, {} closed by the peer during the hold", held.len(), closed);
        drop(held);
        0
    })
}
