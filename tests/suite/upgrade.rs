//! Binary upgrade: a new process takes the listening sockets over from the running one through
//! the upgrade socket, so no connection is refused and no request fails; the old one finishes
//! what it has in flight and exits 0. All with the real binary, on reserved ports.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::{NamedTempFile, TempDir};

use crate::support::certs::TestCa;
use crate::support::child::{signal as kill, Running};
use crate::support::load::{Load, Speak};
use crate::support::proxy::write_config;
use crate::support::raw::RawConn;
use crate::support::{
    client, closed_port, poll_until, reserved_listener, route_toml, upstream_toml, within,
    HttpUpstream,
};

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

fn respond(body: &str) -> String {
    format!("[[route]]\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n")
}

/// The addresses a line of processes shares, one after the other: the web listener, the admin
/// API and the upgrade socket.
struct Site {
    web: SocketAddr,
    admin: SocketAddr,
    socket: PathBuf,
    _dir: TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().expect("a temp dir");
        Site {
            web: closed_port(),
            admin: closed_port(),
            socket: dir.path().join("upgrade.sock"),
            _dir: dir,
        }
    }

    fn toml(&self, tables: &str) -> String {
        format!(
            "[log]\naccess = false\n\n[admin]\nlisten = \"{}\"\n\n\
             [timeouts]\nshutdown_grace = \"20s\"\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"{}\"\nhttp2 = true\n\n{tables}",
            self.admin, self.web
        )
    }

    fn config(&self, tables: &str) -> NamedTempFile {
        write_config(&self.toml(tables))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web)
    }

    async fn wait_up(&self) {
        let up = poll_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(self.web)
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        assert!(up.is_some(), "nothing listened on {}", self.web);
    }

    /// Polls `GET /` until it answers `want`.
    async fn wait_body(&self, want: &str) -> bool {
        let url = self.url("/");
        poll_until(Duration::from_secs(30), || {
            let url = url.clone();
            async move {
                let r = client().get(&url).send().await.ok()?;
                (r.text().await.ok()? == want).then_some(())
            }
        })
        .await
        .is_some()
    }
}

async fn body(url: &str) -> String {
    let r = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status(), 200);
    r.text().await.expect("body")
}

/// `gatehouse run` as a child, its stderr collected; killed on drop if still running.
struct Gh {
    child: Running,
    log: Arc<Mutex<String>>,
}

impl Gh {
    fn run(config: &Path, socket: Option<&Path>, takeover: bool) -> Gh {
        Gh::run_with(config, socket, takeover, &[])
    }

    fn run_with(config: &Path, socket: Option<&Path>, takeover: bool, env: &[(&str, &Path)]) -> Gh {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "-c"]).arg(config);
        if let Some(socket) = socket {
            cmd.arg("--upgrade-socket").arg(socket);
        }
        if takeover {
            cmd.arg("--takeover");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning gatehouse run");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Gh {
            child: Running(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_log(&self, needle: &str) -> bool {
        poll_until(Duration::from_secs(30), || async {
            self.log().contains(needle).then_some(())
        })
        .await
        .is_some()
    }

    fn running(&mut self) -> bool {
        self.child.running()
    }

    fn signal(&self, name: &str) {
        self.child.signal(name);
    }

    /// Waits for the process to exit by itself; its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        self.child.exit_code(Duration::from_secs(30)).await
    }
}

/// Runs the binary to its end (a takeover expected to fail); bounded by a timeout.
async fn run_to_end(args: Vec<std::ffi::OsString>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("running gatehouse")
    });
    within("gatehouse run to exit", run)
        .await
        .expect("the runner thread")
}

fn takeover_args(config: &Path, socket: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "run".into(),
        "-c".into(),
        config.into(),
        "--upgrade-socket".into(),
        socket.into(),
        "--takeover".into(),
    ]
}

/// Upgrades in a row (each process taken over by the next) under steady keep-alive load: not
/// one request may fail, no connection may be refused or reset, every answer comes from a
/// config that was in force, and each process exits 0 once the next one has taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_under_load_refuse_and_fail_nothing() {
    // One config per process; each answers with its own name.
    const NAMES: &[&str] = &["gen0", "gen1", "gen2", "gen3", "gen4", "gen5"];
    const CLIENTS: usize = 6;
    const H2_CLIENTS: usize = 2;
    let upgrades = NAMES.len() - 1;
    let site = Site::new();
    let configs: Vec<NamedTempFile> = NAMES.iter().map(|n| site.config(&respond(n))).collect();
    let mut current = Gh::run(configs[0].path(), Some(&site.socket), false);
    site.wait_up().await;
    assert_eq!(body(&site.url("/")).await, NAMES[0]);

    // HTTP/1.1 clients, and HTTP/2 ones whose streams share one connection each: those must
    // be moved by GOAWAY, not cut.
    let load = Load::start(&site.url("/load"), CLIENTS, NAMES);
    let load_h2 = Load::start_speaking(Speak::H2c, &site.url("/load"), H2_CLIENTS, NAMES);
    for (i, config) in configs.iter().enumerate().skip(1) {
        assert!(load.let_through(500).await, "the load stalled");
        assert!(load_h2.let_through(200).await, "the HTTP/2 load stalled");
        let mut next = Gh::run(config.path(), Some(&site.socket), true);
        assert!(
            site.wait_body(NAMES[i]).await,
            "upgrade {i}: never answered {:?}\nold:\n{}\nnew:\n{}",
            NAMES[i],
            current.log(),
            next.log()
        );
        assert_eq!(
            current.exit_code().await,
            Some(0),
            "upgrade {i}: the old process did not exit 0:\n{}",
            current.log()
        );
        assert!(
            next.running(),
            "upgrade {i}: the new process died:\n{}",
            next.log()
        );
        current = next;
    }
    assert!(load.let_through(500).await, "the load stalled");
    assert!(load_h2.let_through(200).await, "the HTTP/2 load stalled");
    let (tally, elapsed) = load.stop().await;
    let (tally_h2, elapsed_h2) = load_h2.stop().await;
    println!(
        "{}",
        tally_h2.figure(
            &format!("upgrade x{upgrades} (HTTP/2)"),
            "gatehouse",
            &format!(
                "upgrades={upgrades} | clients={H2_CLIENTS} | elapsed_ms={}",
                elapsed_h2.as_millis()
            )
        )
    );
    for e in &tally_h2.examples {
        println!("detail | gatehouse upgrade HTTP/2 | failure: {e}");
    }
    assert_eq!(
        (tally_h2.failed(), tally_h2.refused, tally_h2.reset),
        (0, 0, 0),
        "HTTP/2: {} of {} failed: {:?}",
        tally_h2.failed(),
        tally_h2.sent,
        tally_h2.examples
    );
    // The HTTP/2 connections moved to the new processes after each GOAWAY.
    assert!(
        tally_h2.count(NAMES[0]) > 0 && tally_h2.count(NAMES[upgrades]) > 0,
        "{tally_h2:?}"
    );
    println!(
        "{}",
        tally.figure(
            &format!("upgrade x{upgrades}"),
            "gatehouse",
            &format!(
                "upgrades={upgrades} | clients={CLIENTS} | elapsed_ms={}",
                elapsed.as_millis()
            )
        )
    );
    for e in &tally.examples {
        println!("detail | gatehouse upgrade | failure: {e}");
    }
    assert_eq!(
        (tally.failed(), tally.refused, tally.reset),
        (0, 0, 0),
        "{} of {} failed: {:?}",
        tally.failed(),
        tally.sent,
        tally.examples
    );
    // Every process but the last served some of the load before it was taken over.
    assert!(
        tally.count(NAMES[0]) > 0 && tally.count(NAMES[upgrades]) > 0,
        "{tally:?}"
    );
    current.signal("TERM");
    assert_eq!(current.exit_code().await, Some(0), "{}", current.log());
    assert!(
        !site.socket.exists(),
        "the last process leaves the upgrade socket behind"
    );
}

const SLOW_BODY: &str = "slow response, complete\n";

/// A request the old process is still serving when the new one takes over finishes there, with
/// `Connection: close`, even though it outlasts the window idle connections get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_the_old_process_finishes_with_connection_close() {
    let up = HttpUpstream::delayed(Duration::from_millis(3000), SLOW_BODY).await;
    let site = Site::new();
    let tables = |name: &str| {
        format!(
            "{}{}{}",
            upstream_toml("app", &[up.addr()]),
            route_toml("/slow", "app"),
            respond(name)
        )
    };
    let (a, b) = (site.config(&tables("old")), site.config(&tables("new")));
    let mut old = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;
    let mut conn = RawConn::connect(site.web).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    up.wait_for_requests(1).await;

    let mut new = Gh::run(b.path(), Some(&site.socket), true);
    assert!(
        old.wait_log("handed the listening sockets over").await,
        "no handoff:\n{}\n{}",
        old.log(),
        new.log()
    );
    assert_eq!(body(&site.url("/")).await, "new");
    let resp = conn.read_response(false).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), SLOW_BODY);
    assert!(
        resp.connection_has("close"),
        "the old process's last response must carry Connection: close:\n{}",
        resp.head
    );
    assert!(
        conn.closed_within(Duration::from_secs(10)).await,
        "the connection stays open after Connection: close"
    );
    assert_eq!(old.exit_code().await, Some(0), "{}", old.log());
    assert!(new.running());
    new.signal("TERM");
    assert_eq!(new.exit_code().await, Some(0), "{}", new.log());
}

/// A takeover that cannot start (a broken config; a listener it cannot bind) exits 1 and says
/// why, and the old process goes on as if nothing happened: it serves, reloads, and can still be
/// taken over; the process that does take over reloads its adopted sockets like its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_cannot_start_exits_1_and_the_old_process_keeps_serving() {
    let site = Site::new();
    let a = site.config(&respond("old"));
    let mut old = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;

    let broken_text = site.toml("[[route]]\npath = \"/\"\nrespond = { status = 99 }\n");
    let line = broken_text
        .lines()
        .position(|l| l.starts_with("respond = { status = 99"))
        .expect("the broken line")
        + 1;
    let broken = write_config(&broken_text);
    let out = run_to_end(takeover_args(broken.path(), &site.socket)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let at = format!("{}:{line}:22: ", broken.path().display());
    assert!(stderr.contains(&at), "no {at} in:\n{stderr}");
    assert!(
        stderr.contains("respond.status must be between 200 and 599"),
        "{stderr}"
    );
    assert_eq!(body(&site.url("/")).await, "old");
    assert!(old.running());

    // It compiles, but one of its listeners cannot bind: the takeover is called off.
    let blocker = reserved_listener();
    let taken = blocker.local_addr().expect("blocker address");
    let cannot_bind = site.config(&format!(
        "[[listener]]\nname = \"extra\"\nlisten = \"{taken}\"\n\n{}",
        respond("new")
    ));
    let out = run_to_end(takeover_args(cannot_bind.path(), &site.socket)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {taken}")),
        "{stderr}"
    );
    assert!(
        old.wait_log("could not start, so this process keeps serving")
            .await,
        "{}",
        old.log()
    );
    assert_eq!(body(&site.url("/")).await, "old");

    // Reloads were only held while the takeover was tried.
    std::fs::write(a.path(), site.toml(&respond("old, reloaded"))).expect("rewrite");
    old.signal("HUP");
    assert!(site.wait_body("old, reloaded").await, "{}", old.log());

    // And a good takeover still works.
    let b = site.config(&respond("new"));
    let mut new = Gh::run(b.path(), Some(&site.socket), true);
    assert!(site.wait_body("new").await, "{}\n{}", old.log(), new.log());
    assert_eq!(old.exit_code().await, Some(0), "{}", old.log());

    // The new process reloads on the admin socket it took over; the adopted listener stays.
    std::fs::write(b.path(), site.toml(&respond("new, reloaded"))).expect("rewrite");
    let r = client()
        .post(format!("http://{}/reload", site.admin))
        .send()
        .await
        .expect("POST /reload");
    assert_eq!(r.status(), 200);
    let report: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("report")).expect("JSON report");
    assert_eq!(report["listeners_added"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["listeners_removed"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(body(&site.url("/")).await, "new, reloaded");
    new.signal("TERM");
    assert_eq!(new.exit_code().await, Some(0), "{}", new.log());
    drop(blocker);
}

/// The Unix sockets process `pid` listens on: (inode, path) for each of its descriptors that
/// /proc/net/unix lists with `__SO_ACCEPTCON`.
fn listening_unix_sockets(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let Ok(target) = std::fs::read_link(entry.expect("fd entry").path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(cols.get(3)?, 16).ok()?;
            let inode = cols.get(6)?;
            (flags & 0x0001_0000 != 0 && inodes.contains(*inode))
                .then(|| cols.get(7).copied().unwrap_or("").to_owned())
        })
        .collect()
}

/// Handoff is opt-in: without `--upgrade-socket` no Unix socket listens. With it, exactly that
/// one does, and a second process started afresh on it is refused. `--takeover` with no process
/// on the socket fails clearly and binds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_is_opt_in_and_a_takeover_needs_a_running_process() {
    let site = Site::new();
    let a = site.config(&respond("hi"));
    let mut plain = Gh::run(a.path(), None, false);
    site.wait_up().await;
    assert_eq!(body(&site.url("/")).await, "hi");
    assert_eq!(
        listening_unix_sockets(plain.pid()),
        Vec::<String>::new(),
        "a process without --upgrade-socket listens on a Unix socket"
    );
    plain.signal("TERM");
    assert_eq!(plain.exit_code().await, Some(0), "{}", plain.log());

    let mut with = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;
    assert_eq!(
        listening_unix_sockets(with.pid()),
        vec![site.socket.display().to_string()]
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&site.socket)
            .expect("socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the upgrade socket is open to others");
    // A second process started afresh on the same socket: refused, pointing at --takeover.
    let again = run_to_end(vec![
        "run".into(),
        "-c".into(),
        a.path().into(),
        "--upgrade-socket".into(),
        site.socket.clone().into(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--takeover"), "{stderr}");
    assert_eq!(body(&site.url("/")).await, "hi");
    with.signal("TERM");
    assert_eq!(with.exit_code().await, Some(0), "{}", with.log());
    assert!(
        !site.socket.exists(),
        "the socket file outlives its process"
    );

    // Nothing at the path.
    let out = run_to_end(takeover_args(a.path(), &site.socket)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no such socket: no gatehouse runs with --upgrade-socket"),
        "{stderr}"
    );
    // A socket file left over by a process that is gone.
    drop(std::os::unix::net::UnixListener::bind(&site.socket).expect("a stale socket"));
    let out = run_to_end(takeover_args(a.path(), &site.socket)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing listens there"), "{stderr}");
    assert!(
        tokio::net::TcpStream::connect(site.web).await.is_err(),
        "a failed takeover listened anyway"
    );
    // `--takeover` alone is a usage error.
    let out = run_to_end(vec![
        "run".into(),
        "-c".into(),
        a.path().into(),
        "--takeover".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    // A fresh start replaces the stale socket file.
    let mut fresh = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;
    assert!(
        fresh
            .wait_log("removing the socket of a process that is gone")
            .await
    );
    fresh.signal("TERM");
    assert_eq!(fresh.exit_code().await, Some(0), "{}", fresh.log());
}

/// Kills a process that is not our child (it was started by one) if the test fails early.
struct PidGuard(Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// True once process `pid` is gone (or a zombie waiting for a reaper that is not us).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// As under systemd (`Type=notify`, contrib/gatehouse.service): the process says READY=1 once
/// listening; SIGUSR2 makes it start its own binary with `--takeover` (so the new one runs in
/// the service's cgroup), and once that one has taken over, it names it the main process
/// (MAINPID=) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_new_binary_and_names_it_the_main_process() {
    let site = Site::new();
    let notify_dir = tempfile::tempdir().expect("a temp dir");
    let notify_path = notify_dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).expect("a notify socket");
    let recv = || async {
        let mut buf = [0u8; 512];
        let n = within("a systemd notification", notify.recv(&mut buf))
            .await
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let a = site.config(&respond("before"));
    let mut old = Gh::run_with(
        a.path(),
        Some(&site.socket),
        false,
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    assert_eq!(recv().await, "READY=1");
    site.wait_up().await;
    assert_eq!(body(&site.url("/")).await, "before");

    // A new binary that cannot start (here: the file broken meanwhile) changes nothing, and
    // the next SIGUSR2 tries again.
    std::fs::write(a.path(), "[[route]]\npath = 3\n").expect("rewrite");
    old.signal("USR2");
    assert!(
        old.wait_log("ended (exit status: 1); this process keeps serving")
            .await,
        "{}",
        old.log()
    );
    assert_eq!(body(&site.url("/")).await, "before");

    // The upgrade reads the same file, as a package upgrade leaves it.
    std::fs::write(a.path(), site.toml(&respond("after"))).expect("rewrite");
    old.signal("USR2");
    let said = recv().await;
    let new_pid: u32 = said
        .strip_prefix("MAINPID=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected MAINPID=, got {said:?}\n{}", old.log()));
    let mut guard = PidGuard(Some(new_pid));
    assert_ne!(new_pid, old.pid());
    assert!(site.wait_body("after").await, "{}", old.log());
    assert_eq!(old.exit_code().await, Some(0), "{}", old.log());
    assert_eq!(body(&site.url("/")).await, "after");

    kill("TERM", new_pid);
    let stopped = poll_until(Duration::from_secs(30), || async {
        gone(new_pid).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the new process did not stop on SIGTERM");
    guard.0 = None;
    assert!(tokio::net::TcpStream::connect(site.web).await.is_err());
}

/// `GET /` over TLS to `addr` as `localhost`, with `config` (which says whom to trust): the
/// body, or why not.
async fn tls_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    // The response ends with the connection; a close without close_notify still ends it.
    let _ = within("a TLS response", tls.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200: {head}"));
    }
    Ok(body.to_owned())
}

/// An inherited listening socket gets the TLS settings of the listener it matches in the new
/// config: after the upgrade the TLS listener still speaks TLS, with the new config's
/// certificate, and the plain one beside it stays plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_taken_over_speaks_tls_with_the_new_certificate() {
    let site = Site::new();
    let secure = closed_port();
    // Each process's certificate from its own CA: a client trusting one CA tells them apart.
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let (old_leaf, new_leaf) = (
        old_ca.leaf("old", &["localhost"]),
        new_ca.leaf("new", &["localhost"]),
    );
    let (old_root, new_root) = (old_ca.client(&[b"http/1.1"]), new_ca.client(&[b"http/1.1"]));
    let tables = |name: &str, leaf: &crate::support::certs::Leaf| {
        format!(
            "[[listener]]\nname = \"secure\"\nlisten = \"{secure}\"\ntls = {}\n\n{}",
            leaf.toml(),
            respond(name)
        )
    };
    let a = site.config(&tables("old", &old_leaf));
    let b = site.config(&tables("new", &new_leaf));
    let mut old = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;
    let before = poll_until(Duration::from_secs(20), || async {
        tls_get(secure, Arc::clone(&old_root)).await.ok()
    })
    .await;
    assert_eq!(before.as_deref(), Some("old"), "{}", old.log());

    let mut new = Gh::run(b.path(), Some(&site.socket), true);
    assert!(site.wait_body("new").await, "{}\n{}", old.log(), new.log());
    assert_eq!(old.exit_code().await, Some(0), "{}", old.log());
    assert!(
        new.log()
            .contains("took over the socket of listener secure"),
        "{}",
        new.log()
    );
    assert_eq!(
        tls_get(secure, Arc::clone(&new_root)).await.as_deref(),
        Ok("new")
    );
    let stale = tls_get(secure, Arc::clone(&old_root)).await;
    assert!(
        stale.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "the old certificate is still served: {stale:?}"
    );
    // Plain HTTP to the TLS listener gets no answer; the plain listener answers plainly.
    assert!(client()
        .get(format!("http://{secure}/"))
        .send()
        .await
        .is_err());
    assert_eq!(body(&site.url("/")).await, "new");
    new.signal("TERM");
    assert_eq!(new.exit_code().await, Some(0), "{}", new.log());
}

/// Sends one handoff line with `fd` attached, as the old process does (`SCM_RIGHTS`).
fn send_line_with_fd(
    stream: &std::os::unix::net::UnixStream,
    line: &str,
    fd: std::os::fd::BorrowedFd<'_>,
) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    let iov = [std::io::IoSlice::new(line.as_bytes())];
    let sent =
        rustix::net::sendmsg(stream, &iov, &mut control, SendFlags::empty()).expect("sendmsg");
    assert_eq!(sent, line.len());
}

/// An old process that sends its sockets, hears "taken", and then hangs up without releasing
/// them while it still runs (here: this test, playing its part of the exchange): the new
/// process must not serve beside it. It stops accepting, drains, exits 1 and says why; the
/// socket stays open and listening in the old process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_the_old_process_does_not_release_drains_and_exits_1() {
    use std::io::Write;
    use std::os::fd::AsFd;
    let site = Site::new();
    let web = std::net::TcpListener::bind(site.web).expect("the old process's listener");
    let upgrade =
        std::os::unix::net::UnixListener::bind(&site.socket).expect("the old upgrade socket");
    let config = site.config(&respond("new"));
    let mut new = Gh::run(config.path(), Some(&site.socket), true);

    let (web_fd, web_addr) = (web.as_fd().try_clone_to_owned().expect("dup"), site.web);
    let old = std::thread::spawn(move || {
        let (stream, _) = upgrade.accept().expect("the new process connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("a read timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut hello = String::new();
        reader.read_line(&mut hello).expect("hello");
        assert!(hello.contains("\"hello\""), "{hello}");
        let pid = std::process::id();
        let mut writer = stream.try_clone().expect("clone");
        writeln!(
            writer,
            "{{\"msg\":\"offer\",\"version\":1,\"pid\":{pid},\"sockets\":2}}"
        )
        .expect("offer");
        send_line_with_fd(
            &stream,
            &format!(
                "{{\"msg\":\"socket\",\"kind\":\"listener\",\"name\":\"web\",\"listen\":\"{web_addr}\"}}\n"
            ),
            web_fd.as_fd(),
        );
        send_line_with_fd(
            &stream,
            "{\"msg\":\"socket\",\"kind\":\"upgrade\",\"name\":\"upgrade\",\"listen\":null}\n",
            upgrade.as_fd(),
        );
        let mut taken = String::new();
        reader.read_line(&mut taken).expect("taken");
        taken
        // Hangs up here, without "released", and this process runs on.
    });
    let taken = within(
        "the fake old process",
        tokio::task::spawn_blocking(move || old.join()),
    )
    .await
    .expect("join")
    .expect("the fake old process");
    assert!(taken.contains("\"taken\""), "{taken}");
    assert_eq!(new.exit_code().await, Some(1), "{}", new.log());
    assert!(
        new.log().contains("did not hand the sockets over")
            && new.log().contains("this process drains and exits"),
        "{}",
        new.log()
    );
    // The socket is still open, and listening, here.
    web.set_nonblocking(false).expect("blocking");
    let client = std::net::TcpStream::connect(site.web).expect("connect to the old listener");
    let (accepted, _) = web.accept().expect("accepted by the old process");
    assert_eq!(
        accepted.peer_addr().expect("peer"),
        client.local_addr().expect("local")
    );
}

/// A keep-alive connection left idle at the old process when the new one takes over is closed
/// by the old one (once the window in which its next request would still be answered, with
/// `Connection: close`, is over), and the old process then exits 0: an idle client holds
/// nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_and_the_old_process_exits() {
    let site = Site::new();
    let (a, b) = (site.config(&respond("old")), site.config(&respond("new")));
    let mut old = Gh::run(a.path(), Some(&site.socket), false);
    site.wait_up().await;
    let mut conn = RawConn::connect(site.web).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let resp = conn.read_response(false).await;
    assert_eq!(resp.body_text(), "old");
    assert!(!resp.connection_has("close"), "{}", resp.head);

    let mut new = Gh::run(b.path(), Some(&site.socket), true);
    assert!(site.wait_body("new").await, "{}\n{}", old.log(), new.log());
    assert!(
        conn.closed_within(Duration::from_secs(20)).await,
        "the idle connection stays open at the old process"
    );
    assert_eq!(old.exit_code().await, Some(0), "{}", old.log());
    new.signal("TERM");
    assert_eq!(new.exit_code().await, Some(0), "{}", new.log());
}
