//! Operations under load, side by side on the same backends and the same cadence while
//! keep-alive clients keep sending: 100 config reloads through Gatehouse (the real binary,
//! reloaded by SIGHUP and by `POST /reload`) and through nginx (`nginx -s reload`); and 10
//! binary upgrades through Gatehouse (`run --upgrade-socket PATH --takeover`) and through nginx
//! (USR2, WINCH, QUIT: its documented executable upgrade).
//!
//! Ignored by default (CI does not install nginx); `bash bench/operations.sh` runs them in a
//! release build and writes the figures into `docs/operations.md`. Each proxy prints one line:
//!
//! `operations | reload x100 | PROXY | sent=N | failed=N | refused=N | reset=N | other=N | ...`
//!
//! The two valid configs route `/` to backend "a" or to backend "b", so every answer says which
//! config served it; every tenth reload is of a broken config, which must be refused while the
//! last good one keeps serving; each upgrade starts the new binary on the other config.
//! Gatehouse must lose no request (asserted); nginx's figures are reported as measured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::backend::Backend;
use crate::support::load::{Load, Tally};
use crate::support::{client_with_timeout, closed_port, poll_until};

// nginx, driven the way its documentation says, for the side-by-side runs.
#[path = "operations/nginx.rs"]
mod nginx;
use nginx::{nginx_binary, Nginx};

/// Concurrent keep-alive clients, each with its own connection pool.
const CLIENTS: usize = 8;
const RELOADS: usize = 100;
const UPGRADES: usize = 10;
/// Requests that must go through (all clients together) on each config before the next reload.
const BETWEEN: usize = 100;
/// The longest one reload (or one step of an upgrade) may take to be answered or to be in force.
const RELOAD_LIMIT: Duration = Duration::from_secs(20);

/// Which config a reload puts in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    A,
    B,
    Broken,
}

impl Which {
    /// The body a request gets while this config is in force.
    fn body(self) -> &'static str {
        match self {
            Which::A => "a",
            Which::B => "b",
            Which::Broken => unreachable!("a broken config is never in force"),
        }
    }
}

/// The same sequence as `reload.rs`'s in-process test: B, A, B, ..., and every tenth a broken one.
fn plan(i: usize) -> Which {
    match i {
        i if i % 10 == 9 => Which::Broken,
        i if i % 2 == 0 => Which::B,
        _ => Which::A,
    }
}

/// A client that opens a new connection for every request: it sees what a newcomer gets.
fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("building the probe client")
}

async fn fresh_body(probe: &reqwest::Client, url: &str) -> Option<String> {
    let r = probe.get(url).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// Polls (every 2 ms, for at most `RELOAD_LIMIT`) until a new connection gets `body`.
async fn until_serving(probe: &reqwest::Client, url: &str, body: &str) {
    let deadline = Instant::now() + RELOAD_LIMIT;
    loop {
        if fresh_body(probe, url).await.as_deref() == Some(body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} never served {body:?} after the reload"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn signal(pid: u32, name: &str) {
    crate::support::child::signal(name, pid);
}

/// Whether process `pid` has a handler installed for SIGHUP (Linux: `SigCgt` in /proc).
fn catches_sighup(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0)
}

/// How Gatehouse is told to reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Sighup,
    Post,
}

/// The real binary on reserved ports, one worker thread, stderr kept in a file (every process
/// of a line of upgrades appends to the same one); the current process is killed on drop if it
/// is still running.
struct GatehouseBin {
    child: Child,
    web: SocketAddr,
    admin: SocketAddr,
    upstreams: (SocketAddr, SocketAddr),
    config: PathBuf,
    log: PathBuf,
    /// Serves binary upgrades here, when started for the upgrade test.
    upgrade_socket: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl GatehouseBin {
    async fn start(a: &Backend, b: &Backend) -> GatehouseBin {
        GatehouseBin::start_with(a, b, false).await
    }

    /// With `upgrades`, the process serves binary upgrades on a socket in its temp dir.
    async fn start_with(a: &Backend, b: &Backend, upgrades: bool) -> GatehouseBin {
        let dir = tempfile::tempdir().expect("gatehouse temp dir");
        let (web, admin) = (closed_port(), closed_port());
        let config = dir.path().join("gatehouse.toml");
        let log = dir.path().join("gatehouse.log");
        let upstreams = (a.addr(), b.addr());
        std::fs::write(&config, GatehouseBin::toml(web, admin, upstreams, Which::A))
            .expect("writing the config");
        let upgrade_socket = upgrades.then(|| dir.path().join("upgrade.sock"));
        let child = GatehouseBin::spawn(&config, &log, upgrade_socket.as_deref(), false);
        let gh = GatehouseBin {
            child,
            web,
            admin,
            upstreams,
            config,
            log,
            upgrade_socket,
            _dir: dir,
        };
        let pid = gh.child.id();
        let up = poll_until(Duration::from_secs(20), || async {
            let listening = tokio::net::TcpStream::connect(web).await.is_ok();
            (listening && catches_sighup(pid)).then_some(())
        })
        .await;
        assert!(
            up.is_some(),
            "gatehouse run never listened on {web} with its signal handlers"
        );
        gh
    }

    fn spawn(config: &Path, log: &Path, upgrade_socket: Option<&Path>, takeover: bool) -> Child {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        cmd.args(["run", "-c"]).arg(config);
        if let Some(socket) = upgrade_socket {
            cmd.arg("--upgrade-socket").arg(socket);
        }
        if takeover {
            cmd.arg("--takeover");
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning gatehouse run")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One binary upgrade, as an operator runs it: the other config in the file, then a new
    /// `gatehouse run --takeover` on the same upgrade socket. Done when the old process has
    /// exited (0, asserted) after draining.
    async fn upgrade(&mut self, which: Which) {
        self.write(which);
        let socket = self
            .upgrade_socket
            .clone()
            .expect("started with an upgrade socket");
        let next = GatehouseBin::spawn(&self.config, &self.log, Some(&socket), true);
        let mut old = std::mem::replace(&mut self.child, next);
        let exited = poll_until(RELOAD_LIMIT + Duration::from_secs(30), || {
            let status = old.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        if exited.is_none() {
            let _ = old.kill();
            let _ = old.wait();
        }
        assert_eq!(
            exited.and_then(|s| s.code()),
            Some(0),
            "the old process did not drain and exit 0:\n{}",
            self.log_text()
        );
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "the new process died:\n{}",
            self.log_text()
        );
    }

    fn url(&self) -> String {
        format!("http://{}/", self.web)
    }

    /// The whole file: one worker, no access log, the admin API, one listener, and `/` routed
    /// to "a" or "b" (or a route with an invalid status).
    fn toml(
        web: SocketAddr,
        admin: SocketAddr,
        upstreams: (SocketAddr, SocketAddr),
        which: Which,
    ) -> String {
        let head = format!(
            "workers = 1\n\n[log]\naccess = false\n\n[admin]\nlisten = \"{admin}\"\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"{web}\"\n\n"
        );
        let tables = match which {
            Which::A | Which::B => {
                let server = if which == Which::A {
                    upstreams.0
                } else {
                    upstreams.1
                };
                format!(
                    "[upstream.app]\nservers = [\"{server}\"]\n\n\
                     [[route]]\npath = \"/\"\nupstream = \"app\"\n"
                )
            }
            Which::Broken => "[[route]]\npath = \"/\"\nrespond = { status = 99 }\n".to_owned(),
        };
        format!("{head}{tables}")
    }

    fn write(&self, which: Which) {
        let text = GatehouseBin::toml(self.web, self.admin, self.upstreams, which);
        std::fs::write(&self.config, text).expect("writing the config");
    }

    async fn config_json(&self) -> serde_json::Value {
        let url = format!("http://{}/config", self.admin);
        let r = client_with_timeout(Duration::from_secs(5))
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("GET /config body");
        serde_json::from_str(&text).expect("GET /config is JSON")
    }

    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let r = client_with_timeout(Duration::from_secs(5))
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        r.text().await.expect("metrics text")
    }

    /// Reloads once; `true` if the new config went in force, `false` if it was refused.
    async fn reload(&self, via: Via, which: Which) -> bool {
        self.write(which);
        match via {
            Via::Post => {
                let url = format!("http://{}/reload", self.admin);
                let r = client_with_timeout(RELOAD_LIMIT)
                    .post(&url)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST {url}: {e}"));
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let expect = if which == Which::Broken { 400 } else { 200 };
                assert_eq!(status, expect, "POST /reload: {text}");
                status == 200
            }
            Via::Sighup => {
                let before = self.config_json().await;
                let (ok, failed) = (
                    before["reloads_ok"].as_u64().unwrap_or_default(),
                    before["reloads_failed"].as_u64().unwrap_or_default(),
                );
                signal(self.child.id(), "HUP");
                // The signal is handled between requests of the main loop: wait for its outcome
                // before the next one, so that no two signals are merged into one reload.
                let deadline = Instant::now() + RELOAD_LIMIT;
                loop {
                    let now = self.config_json().await;
                    let (ok_now, failed_now) = (
                        now["reloads_ok"].as_u64().unwrap_or_default(),
                        now["reloads_failed"].as_u64().unwrap_or_default(),
                    );
                    if ok_now + failed_now > ok + failed {
                        let applied = ok_now > ok;
                        assert_eq!(applied, which != Which::Broken, "{now:#}");
                        return applied;
                    }
                    assert!(Instant::now() < deadline, "SIGHUP was not acted on");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
}

impl Drop for GatehouseBin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

enum Under {
    Gatehouse(GatehouseBin, Via),
    Nginx(Nginx),
}

/// One proxy's run: load, 100 reloads at the shared cadence, load stopped.
struct Run {
    tally: Tally,
    elapsed: Duration,
    applied: usize,
    refused: usize,
    /// For each applied reload, from the signal (or POST) to the first new connection served by
    /// the new config.
    in_force: Vec<Duration>,
}

async fn reloads_under_load(under: &Under) -> Run {
    let url = match under {
        Under::Gatehouse(gh, _) => gh.url(),
        Under::Nginx(n) => n.url(),
    };
    let probe = probe_client();
    until_serving(&probe, &url, "a").await;
    let load = Load::start(&url, CLIENTS, &["a", "b"]);
    // A stall is not asserted here: it shows in the figures (nginx's included).
    load.let_through(BETWEEN).await;
    let (mut applied, mut refused, mut by_signaller) = (0, 0, 0);
    let mut in_force = Vec::new();
    let mut serving = Which::A;
    for i in 0..RELOADS {
        let which = plan(i);
        let started = Instant::now();
        let took_effect = match under {
            Under::Gatehouse(gh, via) => gh.reload(*via, which).await,
            Under::Nginx(n) => n.reload(which, &mut by_signaller).await,
        };
        if took_effect {
            serving = which;
            until_serving(&probe, &url, which.body()).await;
            if let Under::Nginx(n) = under {
                // Until an old worker has taken in its QUIT, it still accepts newcomers (and
                // serves them the old config): the reload is over when only the new one is left.
                n.until_one_worker().await;
            }
            in_force.push(started.elapsed());
            applied += 1;
        } else {
            // Refused: the last good config still answers newcomers.
            assert_eq!(
                fresh_body(&probe, &url).await.as_deref(),
                Some(serving.body()),
                "after the refused reload {i}"
            );
            refused += 1;
        }
        load.let_through(BETWEEN).await;
    }
    let (tally, elapsed) = load.stop().await;
    if let Under::Nginx(_) = under {
        println!(
            "detail | nginx | `nginx -s reload` refused {by_signaller} of {refused} broken files itself (exit 1, master not signalled); the master, sent SIGHUP directly, refused {refused} and kept its workers"
        );
    }
    Run {
        tally,
        elapsed,
        applied,
        refused,
        in_force,
    }
}

fn report(proxy: &str, run: &Run) {
    let mut ms: Vec<f64> = run
        .in_force
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let p50 = ms.get(ms.len() / 2).copied().unwrap_or_default();
    let max = ms.last().copied().unwrap_or_default();
    let t = &run.tally;
    let extra = format!(
        "reloads={} | applied={} | rejected={} | in_force_p50_ms={p50:.1} | in_force_max_ms={max:.1} | served a={} b={} | elapsed_ms={}",
        run.applied + run.refused,
        run.applied,
        run.refused,
        t.count("a"),
        t.count("b"),
        run.elapsed.as_millis()
    );
    println!("{}", t.figure(&format!("reload x{RELOADS}"), proxy, &extra));
    for e in &t.examples {
        println!("detail | {proxy} | failure: {e}");
    }
}

/// 100 reloads under 8 keep-alive clients, through Gatehouse (SIGHUP, then `POST /reload`) and
/// through nginx (`nginx -s reload`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/operations.sh"]
async fn reload_under_load_side_by_side() {
    for (via, name) in [
        (Via::Sighup, "gatehouse SIGHUP"),
        (Via::Post, "gatehouse POST /reload"),
    ] {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let gh = GatehouseBin::start(&a, &b).await;
        let under = Under::Gatehouse(gh, via);
        let run = reloads_under_load(&under).await;
        report(name, &run);
        let Under::Gatehouse(mut gh, _) = under else {
            unreachable!()
        };
        let t = &run.tally;
        assert_eq!(
            t.failed(),
            0,
            "{name}: {} of {} failed: {:?}",
            t.failed(),
            t.sent,
            t.examples
        );
        assert_eq!((run.applied, run.refused), (90, 10));
        assert!(t.count("a") > 0 && t.count("b") > 0, "{t:?}");
        let config = gh.config_json().await;
        assert_eq!(config["generation"], 91, "{config:#}");
        assert_eq!(config["reloads_ok"], 90);
        assert_eq!(config["reloads_failed"], 10);
        let metrics = gh.metrics().await;
        for line in [
            "gatehouse_config_reloads_total{result=\"success\"} 90",
            "gatehouse_config_reloads_total{result=\"failure\"} 10",
            "gatehouse_config_generation 91",
        ] {
            assert!(metrics.contains(line), "missing {line}\n{metrics}");
        }
        // The process log says where the broken file is broken.
        signal(gh.child.id(), "TERM");
        let exited = poll_until(Duration::from_secs(20), || {
            let status = gh.child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        assert_eq!(exited.and_then(|s| s.code()), Some(0), "exit after SIGTERM");
        let log = std::fs::read_to_string(&gh.log).expect("the process log");
        let at = format!("{}:", gh.config.display());
        assert!(
            log.contains("config reload failed")
                && log.contains(&at)
                && log.contains("respond.status must be between 200 and 599"),
            "{log}"
        );
    }

    let Some(binary) = nginx_binary() else {
        println!("operations | reload x{RELOADS} | nginx -s reload | not installed");
        return;
    };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let under = Under::Nginx(Nginx::start(binary, &a, &b).await);
    let run = reloads_under_load(&under).await;
    report("nginx -s reload", &run);
    let t = &run.tally;
    // nginx's failures are what this measures: only what a client must never see is asserted.
    assert_eq!(t.bad_body, 0, "{:?}", t.examples);
    assert_eq!((run.applied, run.refused), (90, 10));
    assert!(t.count("a") > 0 && t.count("b") > 0, "{t:?}");
}

/// What a binary upgrade is done to.
enum Upgrading {
    Gatehouse(GatehouseBin),
    Nginx(Nginx),
}

/// One proxy's run: load, `UPGRADES` binary upgrades alternating the config, load stopped.
async fn upgrades_under_load(under: &mut Upgrading) -> Run {
    let url = match under {
        Upgrading::Gatehouse(gh) => gh.url(),
        Upgrading::Nginx(n) => n.url(),
    };
    let probe = probe_client();
    until_serving(&probe, &url, "a").await;
    let load = Load::start(&url, CLIENTS, &["a", "b"]);
    // A stall is not asserted here: it shows in the figures.
    load.let_through(BETWEEN).await;
    let mut in_force = Vec::new();
    for i in 0..UPGRADES {
        let which = if i % 2 == 0 { Which::B } else { Which::A };
        let started = Instant::now();
        match under {
            Upgrading::Gatehouse(gh) => gh.upgrade(which).await,
            Upgrading::Nginx(n) => n.upgrade(which).await,
        }
        until_serving(&probe, &url, which.body()).await;
        in_force.push(started.elapsed());
        load.let_through(BETWEEN).await;
    }
    let (tally, elapsed) = load.stop().await;
    Run {
        tally,
        elapsed,
        applied: UPGRADES,
        refused: 0,
        in_force,
    }
}

/// The figure line of an upgrade run; `done` is from the start of an upgrade to the old process
/// gone and a new connection served by the new one.
fn report_upgrades(proxy: &str, run: &Run) {
    let mut ms: Vec<f64> = run
        .in_force
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let p50 = ms.get(ms.len() / 2).copied().unwrap_or_default();
    let max = ms.last().copied().unwrap_or_default();
    let t = &run.tally;
    let extra = format!(
        "upgrades={} | done_p50_ms={p50:.1} | done_max_ms={max:.1} | served a={} b={} | elapsed_ms={}",
        run.applied,
        t.count("a"),
        t.count("b"),
        run.elapsed.as_millis()
    );
    println!(
        "{}",
        t.figure(&format!("upgrade x{UPGRADES}"), proxy, &extra)
    );
    for e in &t.examples {
        println!("detail | {proxy} | failure: {e}");
    }
}

/// 10 binary upgrades under 8 keep-alive clients, through Gatehouse (a new process with
/// `--takeover` each time) and through nginx (USR2, WINCH, QUIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx; run by bench/operations.sh"]
async fn upgrade_under_load_side_by_side() {
    let name = "gatehouse --takeover";
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut under = Upgrading::Gatehouse(GatehouseBin::start_with(&a, &b, true).await);
    let run = upgrades_under_load(&mut under).await;
    report_upgrades(name, &run);
    let Upgrading::Gatehouse(mut gh) = under else {
        unreachable!()
    };
    let t = &run.tally;
    assert_eq!(
        t.failed(),
        0,
        "{name}: {} of {} failed: {:?}",
        t.failed(),
        t.sent,
        t.examples
    );
    assert!(t.count("a") > 0 && t.count("b") > 0, "{t:?}");
    signal(gh.child.id(), "TERM");
    let exited = poll_until(Duration::from_secs(20), || {
        let status = gh.child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert_eq!(
        exited.and_then(|s| s.code()),
        Some(0),
        "exit after SIGTERM:\n{}",
        gh.log_text()
    );

    let Some(binary) = nginx_binary() else {
        println!("operations | upgrade x{UPGRADES} | nginx USR2 | not installed");
        return;
    };
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mut under = Upgrading::Nginx(Nginx::start(binary, &a, &b).await);
    let run = upgrades_under_load(&mut under).await;
    report_upgrades("nginx USR2+WINCH+QUIT", &run);
    let t = &run.tally;
    assert_eq!(t.bad_body, 0, "{:?}", t.examples);
    assert!(t.count("a") > 0 && t.count("b") > 0, "{t:?}");
}
