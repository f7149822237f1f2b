//! Hot reload: a new config goes in force without dropping a request; a broken one changes
//! nothing and says where it is broken.

use std::time::Duration;

use crate::support::backend::Backend;
use crate::support::child::Running;
use crate::support::h2::H2C_CONFIG;
use crate::support::load::{Load, Speak};
use crate::support::raw::RawConn;
use crate::support::{client, closed_port, poll_until, route_toml, within, HttpUpstream, Proxy};

fn respond(body: &str) -> String {
    format!("[[route]]\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n")
}

fn to_backend(b: &Backend) -> String {
    format!(
        "[upstream.app]\nservers = [\"{}\"]\n\n{}",
        b.addr(),
        route_toml("/", "app")
    )
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

async fn json(proxy: &Proxy, path: &str) -> serde_json::Value {
    let (status, text) = proxy.admin_get(path).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_puts_the_new_routes_and_upstreams_in_force() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = Proxy::start(&to_backend(&a)).await;
    assert_eq!(body(&proxy.url("/")).await, "a");
    proxy.rewrite(&to_backend(&b));
    let (status, report) = proxy.reload().await;
    assert_eq!(status, 200, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).expect("report");
    assert_eq!(report["generation"], 2);
    assert_eq!(body(&proxy.url("/")).await, "b");
    proxy.rewrite(&respond("fixed"));
    assert_eq!(proxy.reload().await.0, 200);
    assert_eq!(body(&proxy.url("/x")).await, "fixed");
    let config = json(&proxy, "/config").await;
    assert_eq!(config["generation"], 3);
    assert_eq!(config["reloads_ok"], 2);
    assert!(config["text"]
        .as_str()
        .unwrap_or_default()
        .contains("fixed"));
    assert_eq!(
        config["path"].as_str(),
        Some(proxy.config_path().display().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_changes_nothing_and_says_where() {
    let proxy = Proxy::start(&respond("old")).await;
    // BASE_CONFIG is 10 lines and a blank one; `respond` is on line 13.
    proxy.rewrite("[[route]]\npath = \"/\"\nrespond = { status = 99 }\n");
    let (status, text) = proxy.reload().await;
    assert_eq!(status, 400, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let problems = answer["problems"].to_string();
    let at = format!("{}:13:22: ", proxy.config_path().display());
    assert!(problems.contains(&at), "{problems}");
    assert!(
        problems.contains("respond.status must be between 200 and 599"),
        "{problems}"
    );
    assert_eq!(body(&proxy.url("/")).await, "old");

    proxy.rewrite("this is not toml [");
    assert_eq!(proxy.reload().await.0, 400);
    assert_eq!(body(&proxy.url("/")).await, "old");

    let config = json(&proxy, "/config").await;
    assert_eq!(config["generation"], 1);
    assert_eq!(config["reloads_failed"], 2);
    assert!(config["last_error"]["problems"].is_array(), "{config:#}");
    let metrics = proxy.metrics().await;
    for line in [
        "gatehouse_config_reloads_total{result=\"failure\"} 2",
        "gatehouse_config_last_reload_successful 0",
        "gatehouse_config_generation 1",
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
    // A good one clears the failure.
    proxy.rewrite(&respond("new"));
    assert_eq!(proxy.reload().await.0, 200);
    assert_eq!(body(&proxy.url("/")).await, "new");
    assert!(proxy
        .metrics()
        .await
        .contains("gatehouse_config_last_reload_successful 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_bound_and_closed_at_runtime() {
    let proxy = Proxy::start(&respond("hi")).await;
    let extra = closed_port();
    let with_extra = format!(
        "[[listener]]\nname = \"extra\"\nlisten = \"{extra}\"\n\n{}",
        respond("hi")
    );
    proxy.rewrite(&with_extra);
    let (status, report) = proxy.reload().await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report.contains("\"listeners_added\":[\"extra\"]"),
        "{report}"
    );
    assert_eq!(body(&format!("http://{extra}/")).await, "hi");
    assert_eq!(proxy.listener_addr("extra"), Some(extra));

    // A keep-alive connection on the listener that goes away finishes its request politely.
    let mut held = RawConn::connect(extra).await;
    proxy.rewrite(&respond("hi"));
    let (status, report) = proxy.reload().await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report.contains("\"listeners_removed\":[\"extra\"]"),
        "{report}"
    );
    let refused = poll_until(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(extra)
            .await
            .err()
            .map(|_| ())
    })
    .await;
    assert!(refused.is_some(), "the removed listener still accepts");
    held.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(held.read_response(false).await.status, 200);
    // The main listener never stopped.
    assert_eq!(body(&proxy.url("/")).await, "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_fails_the_reload_and_changes_nothing() {
    let proxy = Proxy::start(&respond("old")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = taken.local_addr().expect("addr");
    proxy.rewrite(&format!(
        "[[listener]]\nname = \"extra\"\nlisten = \"{addr}\"\n\n{}",
        respond("new")
    ));
    let (status, text) = proxy.reload().await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("cannot listen on"), "{text}");
    assert_eq!(body(&proxy.url("/")).await, "old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_stay_warm_across_a_reload() {
    let up = HttpUpstream::fixed("up\n").await;
    let tables = |route: &str| {
        format!(
            "[upstream.app]\nservers = [\"{}\"]\n\n[[route]]\nname = \"{route}\"\npath = \"/\"\nupstream = \"app\"\n",
            up.addr()
        )
    };
    let proxy = Proxy::start(&tables("first")).await;
    for _ in 0..5 {
        assert_eq!(body(&proxy.url("/")).await, "up\n");
    }
    assert_eq!(up.connections(), 1);
    proxy.rewrite(&tables("second"));
    assert_eq!(proxy.reload().await.0, 200);
    for _ in 0..5 {
        assert_eq!(body(&proxy.url("/")).await, "up\n");
    }
    assert_eq!(
        up.connections(),
        1,
        "the pooled connection survived the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_client_gets_the_new_config_on_its_next_request() {
    let proxy = Proxy::start(&respond("before")).await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(conn.read_response(false).await.body_text(), "before");
    proxy.rewrite(&respond("after"));
    assert_eq!(proxy.reload().await.0, 200);
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(conn.read_response(false).await.body_text(), "after");
}

/// 100 reloads under steady load, alternating two good configs and, every tenth time, a broken
/// one: not one request may fail, and every answer must come from a config in force. The load
/// is HTTP/1.1 keep-alive clients and HTTP/2 (h2c) clients, whose connections stay open across
/// every reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_no_request() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let with_h2c = |tables: String| format!("{H2C_CONFIG}{tables}");
    let proxy = Proxy::start_toml(&with_h2c(to_backend(&a))).await;
    let load = Load::start(&proxy.url("/l"), 6, &["a", "b"]);
    let load_h2 = Load::start_speaking(Speak::H2c, &proxy.url("/l"), 2, &["a", "b"]);
    let mut good = 0;
    for i in 0..100 {
        let (toml, expect) = match i {
            i if i % 10 == 9 => ("[[route]]\npath = \"x\"\n".to_owned(), 400),
            i if i % 2 == 0 => (to_backend(&b), 200),
            _ => (to_backend(&a), 200),
        };
        proxy.rewrite_toml(&with_h2c(toml));
        let (status, text) = within("POST /reload", proxy.reload()).await;
        assert_eq!(status, expect, "reload {i}: {text}");
        good += usize::from(status == 200);
        // Let some requests through on each config.
        assert!(load.let_through(20).await, "the load stalled");
        assert!(load_h2.let_through(10).await, "the HTTP/2 load stalled");
    }
    let (tally, _) = load.stop().await;
    let (tally_h2, _) = load_h2.stop().await;
    for (what, t) in [
        ("reload x100 (HTTP/1.1, in-process)", &tally),
        ("reload x100 (HTTP/2, in-process)", &tally_h2),
    ] {
        // The line bench/operations.sh puts in docs/operations.md.
        println!(
            "{}",
            t.figure(
                what,
                "gatehouse POST /reload",
                &format!("reloads=100 | applied={good} | rejected={}", 100 - good)
            )
        );
        assert_eq!(t.failed(), 0, "{what}: {:?}", t.examples);
        assert!(t.count("a") > 0 && t.count("b") > 0, "{what}: {t:?}");
    }
    assert!(a.requests() > 0 && b.requests() > 0);
    let config = json(&proxy, "/config").await;
    assert_eq!(config["reloads_ok"], 90);
    assert_eq!(config["reloads_failed"], 10);
}

/// The binary on reserved ports, its config file, and a guard that kills it if a test fails.
struct Binary {
    child: Running,
    web: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    config: tempfile::NamedTempFile,
}

impl Binary {
    async fn start(tables: &str) -> Binary {
        let (web, admin) = (closed_port(), closed_port());
        let config = crate::support::proxy::write_config(&Binary::toml(web, admin, tables));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["run", "-c"])
            .arg(config.path())
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning gatehouse run");
        let up = poll_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(web).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "gatehouse run never listened on {web}");
        Binary {
            child: Running(child),
            web,
            admin,
            config,
        }
    }

    fn toml(web: std::net::SocketAddr, admin: std::net::SocketAddr, tables: &str) -> String {
        format!(
            "[log]\naccess = false\n\n[admin]\nlisten = \"{admin}\"\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"{web}\"\n\n{tables}"
        )
    }

    fn rewrite(&self, tables: &str) {
        std::fs::write(
            self.config.path(),
            Binary::toml(self.web, self.admin, tables),
        )
        .expect("rewriting the config");
    }

    fn signal(&self, name: &str) {
        self.child.signal(name);
    }

    /// Waits for the process to exit by itself; its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        self.child.exit_code(Duration::from_secs(20)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    let mut gh = Binary::start(&respond("one")).await;
    let url = format!("http://{}/", gh.web);
    assert_eq!(body(&url).await, "one");
    gh.rewrite(&respond("two"));
    gh.signal("HUP");
    let reloaded = poll_until(Duration::from_secs(20), || {
        let url = url.clone();
        async move { (body(&url).await == "two").then_some(()) }
    })
    .await;
    assert!(reloaded.is_some(), "SIGHUP did not reload");
    // A broken file on SIGHUP: logged, and the process keeps serving the last good config.
    gh.rewrite("[[route]]\npath = 3\n");
    gh.signal("HUP");
    let failed = poll_until(Duration::from_secs(20), || {
        let url = format!("http://{}/metrics", gh.admin);
        async move {
            let text = client().get(&url).send().await.ok()?.text().await.ok()?;
            text.contains("gatehouse_config_reloads_total{result=\"failure\"} 1")
                .then_some(())
        }
    })
    .await;
    assert!(failed.is_some(), "the failed reload was not counted");
    assert_eq!(body(&url).await, "two");
    gh.signal("TERM");
    assert_eq!(gh.exit_code().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_finishes_and_exits() {
    let mut gh = Binary::start(&respond("bye")).await;
    let url = format!("http://{}/", gh.web);
    assert_eq!(body(&url).await, "bye");
    let r = client()
        .post(format!("http://{}/drain", gh.admin))
        .send()
        .await
        .expect("POST /drain");
    assert_eq!(r.status(), 202);
    assert_eq!(
        gh.exit_code().await,
        Some(0),
        "the process exits after the drain"
    );
    assert!(tokio::net::TcpStream::connect(gh.web).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_follow_the_config_in_force() {
    let up = crate::support::flaky::FlakyUpstream::start("up").await;
    let checked = format!(
        "[upstream.app]\nservers = [\"{}\"]\n[upstream.app.health_check]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"40ms\"\n\n{}",
        up.addr(),
        route_toml("/", "app")
    );
    let proxy = Proxy::start(&checked).await;
    let started = poll_until(Duration::from_secs(10), || async {
        (up.check_answers().len() >= 3).then_some(())
    })
    .await;
    assert!(started.is_some(), "no health checks");
    // The same upstream without a check: the old snapshot's checker stops.
    proxy.rewrite(&format!(
        "[upstream.app]\nservers = [\"{}\"]\n\n{}",
        up.addr(),
        route_toml("/", "app")
    ));
    assert_eq!(proxy.reload().await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_reload = up.check_answers().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.check_answers().len(),
        after_reload,
        "checks went on after the reload"
    );
    assert_eq!(body(&proxy.url("/")).await, "up");
}

/// `[reload] watch = true`, looked at every 50 ms, and a `/` that answers `body`.
fn watched(body: &str) -> String {
    format!(
        "[reload]\nwatch = true\ninterval = \"50ms\"\n\n{}",
        respond(body)
    )
}

/// Waits until `/` answers `want`; false after 20 s.
async fn serves(proxy: &Proxy, want: &str) -> bool {
    let url = proxy.url("/");
    poll_until(Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let r = client().get(&url).send().await.ok()?;
            (r.text().await.ok()? == want).then_some(())
        }
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_file_is_reloaded_when_it_changes_and_a_broken_one_is_refused_once() {
    let proxy = Proxy::start(&watched("one")).await;
    assert_eq!(body(&proxy.url("/")).await, "one");

    // Written in place, as an editor saving over the file does.
    proxy.rewrite(&watched("two"));
    assert!(serves(&proxy, "two").await, "the change was not picked up");

    // Replaced by rename, as atomic deploys (and kubectl) do: a new inode.
    let dir = proxy.config_path().parent().expect("config dir");
    let staged = dir.join(format!(
        "{}.new",
        proxy
            .config_path()
            .file_name()
            .expect("name")
            .to_string_lossy()
    ));
    std::fs::write(
        &staged,
        format!("{}{}", crate::support::proxy::BASE_CONFIG, watched("three")),
    )
    .expect("staging");
    std::fs::rename(&staged, proxy.config_path()).expect("rename");
    assert!(
        serves(&proxy, "three").await,
        "the replaced file was not picked up"
    );

    // Broken: refused, the old config keeps serving, and it is tried once, not every interval.
    proxy.rewrite("[[listener]]\nname = 3\n");
    let failed = poll_until(Duration::from_secs(20), || async {
        let m = proxy.metrics().await;
        m.contains("gatehouse_config_reloads_total{result=\"failure\"} 1")
            .then_some(())
    })
    .await;
    assert!(failed.is_some(), "{}", proxy.metrics().await);
    // Ten more intervals: still one failure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = proxy.metrics().await;
    assert!(
        m.contains("gatehouse_config_reloads_total{result=\"failure\"} 1"),
        "{m}"
    );
    assert_eq!(body(&proxy.url("/")).await, "three");

    // Fixed: in force.
    proxy.rewrite(&watched("four"));
    assert!(serves(&proxy, "four").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_watch_a_changed_file_waits_for_a_signal() {
    let proxy = Proxy::start(&respond("one")).await;
    proxy.rewrite(&respond("two"));
    // Several default watch intervals' worth: nothing changes by itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(body(&proxy.url("/")).await, "one");
    let (status, _) = proxy.reload().await;
    assert_eq!(status, 200);
    assert_eq!(body(&proxy.url("/")).await, "two");
}
