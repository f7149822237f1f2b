//! Config pipeline tests: text in, `Snapshot` or exact `line:col` diagnostics out.

use std::path::Path;
use std::time::Duration;

use super::snapshot::{AccessTarget, HostMatch, LogFormat, RouteAction, Snapshot, UpstreamId};
use super::{load, load_str, ConfigError};
use crate::metrics::Metrics;

/// Three lines that make a file valid on their own; error positions below count them.
const LISTENER: &str = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n";

fn compile(text: &str) -> Result<Snapshot, ConfigError> {
    load_str(Path::new("t.toml"), text, &Metrics::default())
}

/// Compiles `text` and returns its diagnostics as `LINE:COL: message`; panics if it compiles.
fn errors(text: &str) -> Vec<String> {
    match compile(text) {
        Ok(_) => panic!("expected errors, the config compiled:\n{text}"),
        Err(e) => e
            .diagnostics
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
            .collect(),
    }
}

/// The one diagnostic of `text`, which must start with `position` ("LINE:COL") and contain `needle`.
#[track_caller]
fn assert_one_error(text: &str, position: &str, needle: &str) {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!("{position}: ")) && errors[0].contains(needle),
        "expected {position}: ...{needle}..., got {:?}",
        errors[0]
    );
}

#[track_caller]
fn ok(text: &str) -> Snapshot {
    match compile(text) {
        Ok(s) => s,
        Err(e) => panic!("config did not compile:\n{e}"),
    }
}

#[test]
fn schema_example_compiles_with_expected_values() {
    let s = ok(r#"
workers = 2
[log]
access = "stdout"
format = "json"
[admin]
listen = "127.0.0.1:9901"
[timeouts]
client_header = "10s"
client_body = "60s"
client_idle = "75s"
connect = "5s"
response_header = "60s"
upstream_read = "60s"
upstream_write = "60s"
upstream_idle = "60s"
shutdown_grace = "30s"
[limits]
max_header_bytes = "16KiB"
max_headers = 100
max_uri_bytes = "8KiB"
max_body_bytes = "1MiB"
max_connections = 10000
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
max_connections = 10000
[upstream.app]
servers = ["127.0.0.1:9000", { address = "127.0.0.1:9001", weight = 3 }]
keepalive = 32
timeouts = { connect = "2s", response_header = "30s", read = "30s", write = "30s", idle = "60s" }
[[route]]
name = "api"
host = "App.Example.com"
path = "/api/"
upstream = "app"
max_body_bytes = "10MiB"
timeouts = { client_body = "60s", response_header = "30s", upstream_read = "30s", upstream_write = "30s" }
access_log = true
[[route]]
path = "/"
respond = { status = 200, body = "hello\n", content_type = "text/plain; charset=utf-8" }
"#);
    assert_eq!(s.workers, Some(2));
    assert_eq!(s.log.access, AccessTarget::Stdout);
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(
        s.admin.as_ref().map(|a| a.listen.to_string()),
        Some("127.0.0.1:9901".into())
    );
    assert_eq!(s.listeners.len(), 1);
    assert_eq!(s.listeners[0].name, "web");
    assert_eq!(s.listeners[0].listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.limits.max_header_bytes, 16 * 1024);
    assert_eq!(s.limits.max_headers, 100);
    assert_eq!(s.limits.max_uri_bytes, 8 * 1024);
    assert_eq!(s.timeouts.client_header, Duration::from_secs(10));
    assert_eq!(s.timeouts.client_idle, Duration::from_secs(75));
    assert_eq!(s.timeouts.shutdown_grace, Duration::from_secs(30));

    let app = s.upstream(UpstreamId(0));
    assert_eq!(app.name, "app");
    let targets = app.targets.load();
    assert_eq!(targets.servers.len(), 2);
    assert_eq!(targets.servers[1].weight, 3);
    assert_eq!(&*targets.servers[1].key, "app/127.0.0.1:9001");
    match &targets.primary {
        crate::balance::Balancer::RoundRobin(rr) => assert_eq!(rr.cycle_len(), 4),
        other => panic!("default balance is round-robin, got {other:?}"),
    }
    assert_eq!(app.max_idle_per_server, 32);
    assert_eq!(app.timeouts.connect, Duration::from_secs(2));

    let api = &s.routes[0];
    assert_eq!(&*api.name, "api");
    assert_eq!(api.host, Some(HostMatch::Exact("app.example.com".into())));
    assert!(matches!(api.action, RouteAction::Proxy(UpstreamId(0))));
    assert_eq!(api.max_body_bytes, 10 * 1024 * 1024);
    assert!(api.access_log);

    let hello = &s.routes[1];
    assert_eq!(&*hello.name, "route2");
    assert!(hello.upstream_timeouts.is_none());
    match &hello.action {
        RouteAction::Respond(r) => {
            assert_eq!(r.status, 200);
            assert_eq!(&r.body[..], b"hello\n");
            assert_eq!(r.content_type, "text/plain; charset=utf-8");
        }
        other => panic!("expected a respond route, got {other:?}"),
    }
    assert_eq!(
        s.router
            .find("app.example.com", b"/api/x")
            .map(|r| &*r.name),
        Some("api")
    );
    assert_eq!(
        s.router.find("other", b"/x").map(|r| &*r.name),
        Some("route2")
    );
}

#[test]
fn defaults_fill_every_omitted_key() {
    let s = ok(&format!(
        "{LISTENER}[upstream.app]\nservers = [\"127.0.0.1:9000\"]\n\
         [[route]]\npath = \"/\"\nupstream = \"app\"\n\
         [[route]]\npath = \"/r\"\nrespond = {{ status = 204 }}\n"
    ));
    assert_eq!(s.workers, None);
    assert_eq!(s.log.access, AccessTarget::Stdout);
    assert_eq!(s.log.format, LogFormat::Text);
    assert!(s.admin.is_none());
    assert_eq!(s.listeners[0].max_connections, 10_000);
    assert_eq!(s.limits.max_header_bytes, 16 * 1024);
    assert_eq!(s.limits.max_headers, 100);
    assert_eq!(s.limits.max_uri_bytes, 8 * 1024);
    assert_eq!(s.timeouts.client_header, Duration::from_secs(10));
    assert_eq!(s.timeouts.client_idle, Duration::from_secs(75));
    assert_eq!(s.timeouts.shutdown_grace, Duration::from_secs(30));

    let app = s.upstream(UpstreamId(0));
    assert_eq!(app.targets.load().servers[0].weight, 1);
    assert_eq!(app.max_idle_per_server, 128);
    assert_eq!(app.timeouts.connect, Duration::from_secs(5));
    assert_eq!(app.timeouts.response_header, Duration::from_secs(60));
    assert_eq!(app.timeouts.read, Duration::from_secs(60));
    assert_eq!(app.timeouts.write, Duration::from_secs(60));
    assert_eq!(app.timeouts.idle, Duration::from_secs(60));

    let r = &s.routes[0];
    assert_eq!(&*r.name, "route1");
    assert_eq!(r.host, None);
    assert_eq!(r.max_body_bytes, 1024 * 1024);
    assert_eq!(r.client_body_timeout, Duration::from_secs(60));
    assert_eq!(r.upstream_timeouts, Some(app.timeouts));
    assert!(r.access_log);

    match &s.routes[1].action {
        RouteAction::Respond(r) => {
            assert_eq!(r.status, 204);
            assert!(r.body.is_empty());
            assert_eq!(r.content_type, "text/plain; charset=utf-8");
        }
        other => panic!("expected a respond route, got {other:?}"),
    }
}

#[test]
fn overrides_resolve_route_over_upstream_over_global() {
    let s = ok(&format!(
        r#"[timeouts]
client_body = "11s"
connect = "12s"
response_header = "13s"
upstream_read = "14s"
upstream_write = "15s"
upstream_idle = "16s"
[limits]
max_body_bytes = "2m"
max_connections = 7
{LISTENER}max_connections = 3
[[listener]]
name = "other"
listen = "127.0.0.1:0"
[upstream.a]
servers = ["127.0.0.1:1"]
timeouts = {{ connect = "500ms", read = "2m" }}
[upstream.b]
servers = ["127.0.0.1:2"]
[[route]]
path = "/a"
upstream = "a"
max_body_bytes = 10
timeouts = {{ client_body = "1s", response_header = "1h", upstream_write = 9 }}
access_log = false
[[route]]
path = "/b"
upstream = "b"
"#
    ));
    assert_eq!(s.listeners[0].max_connections, 3);
    assert_eq!(s.listeners[1].max_connections, 7);

    let a = s.upstream(UpstreamId(0));
    assert_eq!(a.name, "a");
    assert_eq!(a.timeouts.connect, Duration::from_millis(500));
    assert_eq!(a.timeouts.response_header, Duration::from_secs(13));
    assert_eq!(a.timeouts.read, Duration::from_secs(120));
    assert_eq!(a.timeouts.write, Duration::from_secs(15));
    assert_eq!(a.timeouts.idle, Duration::from_secs(16));

    let ra = &s.routes[0];
    assert_eq!(ra.max_body_bytes, 10);
    assert_eq!(ra.client_body_timeout, Duration::from_secs(1));
    assert!(!ra.access_log);
    let t = ra
        .upstream_timeouts
        .unwrap_or_else(|| panic!("proxy route"));
    assert_eq!(t.connect, Duration::from_millis(500));
    assert_eq!(t.response_header, Duration::from_secs(3600));
    assert_eq!(t.read, Duration::from_secs(120));
    assert_eq!(t.write, Duration::from_secs(9));
    assert_eq!(t.idle, Duration::from_secs(16));

    let rb = &s.routes[1];
    assert!(matches!(rb.action, RouteAction::Proxy(UpstreamId(1))));
    assert_eq!(rb.max_body_bytes, 2 * 1024 * 1024);
    assert_eq!(rb.client_body_timeout, Duration::from_secs(11));
    assert_eq!(
        rb.upstream_timeouts,
        Some(s.upstream(UpstreamId(1)).timeouts)
    );
}

#[test]
fn wildcard_host_is_stored_as_suffix() {
    let s = ok(&format!(
        "{LISTENER}[[route]]\nhost = \"*.Example.com\"\npath = \"/\"\nrespond = {{ status = 200 }}\n"
    ));
    assert_eq!(
        s.routes[0].host,
        Some(HostMatch::Suffix(".example.com".into()))
    );
}

#[test]
fn upstreams_keep_file_order() {
    let s = ok(&format!(
        "{LISTENER}[upstream.zeta]\nservers = [\"127.0.0.1:1\"]\n[upstream.alpha]\nservers = [\"127.0.0.1:2\"]\n"
    ));
    let names: Vec<&str> = s.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha"]);
}

#[test]
fn access_log_targets() {
    let with = |v: &str| compile(&format!("[log]\naccess = {v}\n{LISTENER}")).map(|s| s.log.access);
    assert_eq!(with("false").ok(), Some(AccessTarget::Off));
    assert_eq!(with("\"stderr\"").ok(), Some(AccessTarget::Stderr));
    assert_eq!(
        with("\"/tmp/a.log\"").ok(),
        Some(AccessTarget::File("/tmp/a.log".into()))
    );
    assert_one_error(
        &format!("[log]\naccess = true\n{LISTENER}"),
        "2:10",
        "file path, or false",
    );
}

// Every check below uses the exact position of the value at fault. Columns count characters from
// 1, and a string value's position is its opening quote.

#[test]
fn unknown_upstream_points_at_the_value() {
    assert_one_error(
        &format!("{LISTENER}[[route]]\npath = \"/\"\nupstream = \"nope\"\n"),
        "6:12",
        "unknown upstream \"nope\"",
    );
}

#[test]
fn upstream_and_respond_exactly_one() {
    assert_one_error(
        &format!(
            "{LISTENER}[upstream.a]\nservers = [\"127.0.0.1:1\"]\n[[route]]\npath = \"/\"\n\
             upstream = \"a\"\nrespond = {{ status = 200 }}\n"
        ),
        "9:11",
        "not both",
    );
    assert_one_error(
        &format!("{LISTENER}[[route]]\npath = \"/\"\n"),
        "4:1",
        "needs `upstream",
    );
}

#[test]
fn duplicate_host_and_path() {
    let text = format!(
        "{LISTENER}[[route]]\nhost = \"a.com\"\npath = \"/\"\nrespond = {{ status = 200 }}\n\
         [[route]]\nhost = \"A.com\"\npath = \"/\"\nrespond = {{ status = 200 }}\n\
         [[route]]\npath = \"/\"\nrespond = {{ status = 200 }}\n"
    );
    assert_one_error(
        &text,
        "10:8",
        "same host and path as route \"route1\" (line 6)",
    );
}

#[test]
fn duplicate_route_names() {
    let text = format!(
        "{LISTENER}[[route]]\nname = \"x\"\npath = \"/a\"\nrespond = {{ status = 200 }}\n\
         [[route]]\nname = \"x\"\npath = \"/b\"\nrespond = {{ status = 200 }}\n"
    );
    assert_one_error(
        &text,
        "9:8",
        "duplicate route name \"x\" (first used on line 5)",
    );
    // An explicit name can collide with the default name of a later route.
    let text = format!(
        "{LISTENER}[[route]]\nname = \"route2\"\npath = \"/a\"\nrespond = {{ status = 200 }}\n\
         [[route]]\npath = \"/b\"\nrespond = {{ status = 200 }}\n"
    );
    assert_one_error(&text, "8:1", "duplicate route name \"route2\"");
}

#[test]
fn listener_checks() {
    assert_one_error(
        &format!("{LISTENER}[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\n"),
        "5:8",
        "duplicate listener name \"web\" (first used on line 2)",
    );
    let two = "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:8080\"\n\
               [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:8080\"\n";
    assert_one_error(two, "6:10", "already used by listener \"a\" (line 3)");
    assert_one_error("workers = 1\n", "1:1", "no [[listener]]");
    assert_one_error(
        "[[listener]]\nname = \"web\"\nlisten = \"localhost:80\"\n",
        "3:10",
        "bad listen address",
    );
    assert_one_error(
        "[[listener]]\nname = \"w b\"\nlisten = \"127.0.0.1:0\"\n",
        "2:8",
        "bad listener name",
    );
    assert_one_error(
        "[admin]\nlisten = \"127.0.0.1:80\"\n[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:80\"\n",
        "2:10",
        "already used by listener \"w\"",
    );
}

#[test]
fn server_checks() {
    assert_one_error(
        &format!("{LISTENER}[upstream.a]\nservers = [\"backend\"]\n"),
        "5:12",
        "expected IP:port or name:port",
    );
    assert_one_error(
        &format!("{LISTENER}[upstream.a]\nservers = [{{ address = \"10.0.0.1\" }}]\n"),
        "5:24",
        "bad server address",
    );
    assert_one_error(
        &format!(
            "{LISTENER}[upstream.a]\nservers = [{{ address = \"10.0.0.1:1\", weight = 1001 }}]\n"
        ),
        "5:47",
        "weight must be between 1 and 1000, got 1001",
    );
    assert_one_error(
        &format!("{LISTENER}[upstream.a]\nservers = []\n"),
        "5:11",
        "has no servers",
    );
    assert_one_error(
        &format!("{LISTENER}[upstream.a]\nservers = [\"10.0.0.1:1\", \"10.0.0.1:1\"]\n"),
        "5:26",
        "listed twice",
    );
    assert_one_error(
        &format!("{LISTENER}[upstream.\"a.b\"]\nservers = [\"10.0.0.1:1\"]\n"),
        "4:11",
        "bad upstream name",
    );
    assert_one_error(
        &format!("{LISTENER}[upstream.a]\nservers = [\"10.0.0.1:1\"]\nkeepalive = -1\n"),
        "6:13",
        "keepalive must be at least 0",
    );
}

#[test]
fn route_value_checks() {
    let route = |body: &str| format!("{LISTENER}[[route]]\n{body}\n");
    assert_one_error(
        &route("host = \"a.*.com\"\npath = \"/\"\nrespond = { status = 200 }"),
        "5:8",
        "only a leading",
    );
    assert_one_error(
        &route("host = \"a.com:80\"\npath = \"/\"\nrespond = { status = 200 }"),
        "5:8",
        "must not include a port",
    );
    assert_one_error(
        &route("path = \"api\"\nrespond = { status = 200 }"),
        "5:8",
        "must start with '/'",
    );
    assert_one_error(
        &route("path = \"/\"\nrespond = { status = 99 }"),
        "6:22",
        "respond.status must be between 200 and 599, got 99",
    );
    assert_one_error(
        &route("path = \"/\"\nrespond = { status = 204, body = \"x\" }"),
        "6:34",
        "cannot have a body",
    );
    assert_one_error(
        &route("name = \"a b\"\npath = \"/\"\nrespond = { status = 200 }"),
        "5:8",
        "bad route name",
    );
    assert_one_error(
        &route("path = \"/\"\nrespond = { status = 200 }\ntimeouts = { upstream_read = \"1s\" }"),
        "7:30",
        "no effect on a route that uses `respond`",
    );
}

#[test]
fn duration_size_and_range_checks() {
    assert_one_error(
        &format!("[timeouts]\nconnect = \"5 s\"\n{LISTENER}"),
        "2:11",
        "expected a duration such as \"500ms\"",
    );
    assert_one_error(
        &format!("[timeouts]\nconnect = 0\n{LISTENER}"),
        "2:11",
        "must be > 0",
    );
    assert_one_error(
        &format!("[limits]\nmax_body_bytes = \"1TB\"\n{LISTENER}"),
        "2:18",
        "expected a size such as \"16KiB\"",
    );
    assert_one_error(
        &format!("workers = 0\n{LISTENER}"),
        "1:11",
        "workers must be between 1 and 1024, got 0",
    );
    assert_one_error(
        &format!("workers = 1025\n{LISTENER}"),
        "1:11",
        "workers must be between 1 and 1024",
    );
    assert_one_error(
        &format!("[log]\nformat = \"xml\"\n{LISTENER}"),
        "2:10",
        "expected \"text\" or \"json\"",
    );
}

#[test]
fn every_semantic_error_is_reported_in_file_order() {
    let text = "workers = 0\n\
                [timeouts]\nconnect = \"soon\"\n\
                [upstream.app]\nservers = [\"backend\", { address = \"10.0.0.1:1\", weight = 0 }]\n\
                [[route]]\npath = \"x\"\nupstream = \"ghost\"\n";
    let errors = errors(text);
    let positions: Vec<&str> = errors
        .iter()
        .map(|e| e.split(": ").next().unwrap_or(""))
        .collect();
    assert_eq!(
        positions,
        ["1:1", "1:11", "3:11", "5:12", "5:58", "7:8", "8:12"],
        "{errors:#?}"
    );
    assert!(errors[0].contains("no [[listener]]"));
}

#[test]
fn schema_errors_have_positions() {
    // The misspelt key is dropped and the checks still run, so the route also lacks a `respond`.
    assert_eq!(
        errors(&format!(
            "{LISTENER}[[route]]\npath = \"/\"\nrespnd = {{ status = 200 }}\n"
        )),
        [
            "4:1: route \"route1\" needs `upstream = \"<name>\"` or `respond = { status = 200 }`",
            "6:1: unknown field `respnd`, expected one of `name`, `host`, `path`, `upstream`, \
             `respond`, `max_body_bytes`, `timeouts`, `access_log`, `retry_with_body`",
        ]
    );
    assert_one_error(
        &format!("{LISTENER}[limits]\nmax_headers = \"many\"\n"),
        "5:15",
        "invalid type: string \"many\"",
    );
    assert_one_error(
        &format!("{LISTENER}[timeouts]\nconnect = true\n"),
        "5:11",
        "expected a duration such as",
    );
    assert_one_error(
        "[[listener]]\nname = \"web\"\n",
        "1:1",
        "missing field `listen`",
    );
    assert_one_error("[[listener]\n", "1:12", "");
    assert_one_error(
        &format!(
            "{LISTENER}[upstream.a]\nservers = [{{ address = \"10.0.0.1:1\", wieght = 2 }}]\n"
        ),
        "5:38",
        "unknown field `wieght`",
    );
}

#[test]
fn every_unknown_key_is_reported_with_the_other_problems() {
    let text = format!(
        "{LISTENER}colour = \"blue\"\n\
         [upstream.app]\nservers = [\"127.0.0.1:9000\"]\nflavour = \"vanilla\"\n\
         [[route]]\npath = \"/\"\nupstream = \"nope\"\n"
    );
    assert_eq!(
        errors(&text),
        [
            "4:1: unknown field `colour`, expected one of `name`, `listen`, `max_connections`, `tls`, `client_auth`, `http2`",
            "7:1: unknown field `flavour`, expected one of `servers`, `protocol`, `keepalive`, `timeouts`, \
             `balance`, `hash_key`, `sticky_cookie`, `slow_start`, `panic_threshold`, \
             `max_conns`, `max_pending`, `queue_timeout`, `health_check`, `outlier`, `retry`, `tls`",
            "10:12: unknown upstream \"nope\" (defined: app)",
        ]
    );
}

#[test]
fn unknown_keys_are_found_in_every_table() {
    let text = r#"logs = 1
log.colour = "x"
"quoted key" = 2
[adminn]
listen = "x"
[admin]
listen = "127.0.0.1:9901"
bind = 1
[timeouts]
conect = 1
[limits]
max_bodies = 1
[[listener]]
name = "web"
listen = "127.0.0.1:0"
[upstream.app]
servers = [{ address = "127.0.0.1:1", wieght = 2 }, "127.0.0.1:2"]
timeouts = { conect = "1s" }
[upstream.app.extra]
a = 1
[[route]]
path = "/"
respond = { status = 200, bdy = "x" }
timeouts.clinet_body = "1s"
[[routes]]
path = "/"
"#;
    let positions: Vec<String> = errors(text)
        .iter()
        .map(|e| {
            let (position, message) = e.split_once(": ").unwrap_or_default();
            let key = message.split('`').nth(1).unwrap_or_default();
            format!("{position} {key}")
        })
        .collect();
    assert_eq!(
        positions,
        [
            "1:1 logs",
            "2:5 colour",
            "3:1 quoted key",
            "4:2 adminn",
            "8:1 bind",
            "10:1 conect",
            "12:1 max_bodies",
            "17:39 wieght",
            "18:14 conect",
            "19:15 extra",
            "23:27 bdy",
            "24:10 clinet_body",
            "25:3 routes",
        ]
    );
}

#[test]
fn unknown_key_and_wrong_type_are_both_reported() {
    assert_eq!(
        errors(&format!(
            "{LISTENER}[limits]\nmax_headers = \"many\"\nmax_header = 1\n"
        ))
        .iter()
        .map(|e| e.split(": ").next().unwrap_or_default())
        .collect::<Vec<_>>(),
        ["5:15", "6:1"]
    );
}

/// `keys::ROOT` names which serde struct describes which table; the keys themselves come from
/// serde. Every table `examples/full.toml` uses (it uses every key) must be described, and every
/// description must name real keys.
#[test]
fn key_scan_describes_every_table() {
    use super::keys::{Node, ROOT};
    use toml::de::{DeTable, DeValue};

    fn check_node(node: &Node, path: &str) {
        match node {
            Node::Struct { fields, children } => {
                let fields = fields();
                assert!(!fields.is_empty(), "{path}: no fields caught from serde");
                for (name, child) in *children {
                    assert!(fields.contains(name), "{path}: `{name}` is not a key");
                    check_node(child, &format!("{path}.{name}"));
                }
            }
            Node::Map(each) | Node::Array(each) | Node::OneOrMany(each) => {
                check_node(each, &format!("{path}[]"))
            }
        }
    }

    fn holds_tables(value: &DeValue<'_>) -> bool {
        match value {
            DeValue::Table(_) => true,
            DeValue::Array(a) => a.iter().any(|v| holds_tables(v.get_ref())),
            _ => false,
        }
    }

    fn walk(node: &Node, value: &DeValue<'_>, path: &str, seen: &mut Vec<String>) {
        match (node, value) {
            (Node::Struct { children, .. }, DeValue::Table(table)) => {
                seen.push(path.to_owned());
                for (key, value) in table.iter() {
                    let key: &str = key.get_ref();
                    let path = format!("{path}.{key}");
                    match children.iter().find(|(name, _)| *name == key) {
                        Some((_, child)) => walk(child, value.get_ref(), &path, seen),
                        None => assert!(
                            !holds_tables(value.get_ref()),
                            "{path} holds tables but keys::ROOT does not describe it"
                        ),
                    }
                }
            }
            (Node::Map(each), DeValue::Table(table)) => {
                for (_, value) in table.iter() {
                    walk(each, value.get_ref(), &format!("{path}[]"), seen);
                }
            }
            (Node::Array(each) | Node::OneOrMany(each), DeValue::Array(array)) => {
                for value in array.iter() {
                    if let DeValue::Table(_) = value.get_ref() {
                        walk(each, value.get_ref(), &format!("{path}[]"), seen);
                    }
                }
            }
            (Node::OneOrMany(each), DeValue::Table(_)) => {
                walk(each, value, &format!("{path}[]"), seen)
            }
            _ => panic!("{path} has a shape keys::ROOT does not expect"),
        }
    }

    check_node(&ROOT, "");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/full.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let root = DeTable::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    walk(&ROOT, &DeValue::Table(root.into_inner()), "", &mut seen);
    seen.sort();
    seen.dedup();
    // Every described table is used by the example, so the checks above covered them all.
    assert_eq!(
        seen,
        [
            "",
            ".admin",
            ".http2",
            ".limits",
            ".listener[]",
            ".listener[].client_auth",
            ".listener[].tls[]",
            ".log",
            ".reload",
            ".resolver",
            ".route[]",
            ".route[].respond",
            ".route[].timeouts",
            ".timeouts",
            ".upstream[]",
            ".upstream[].health_check",
            ".upstream[].outlier",
            ".upstream[].retry",
            ".upstream[].servers[]",
            ".upstream[].timeouts",
            ".upstream[].tls",
        ]
    );
}

#[test]
fn display_is_file_line_col_message() {
    let err = match compile("workers = 0\n") {
        Ok(_) => panic!("compiled"),
        Err(e) => e,
    };
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("t.toml:1:1: no [[listener]]"));
    assert_eq!(
        lines[1],
        "t.toml:1:11: workers must be between 1 and 1024, got 0"
    );
}

#[test]
fn unreadable_file_is_one_diagnostic_at_the_start() {
    let path = Path::new("/nonexistent/gatehouse.toml");
    let err = match load(path, &Metrics::default()) {
        Ok(_) => panic!("loaded a missing file"),
        Err(e) => e,
    };
    assert_eq!(err.diagnostics.len(), 1);
    let d = &err.diagnostics[0];
    assert_eq!((d.line, d.col), (1, 1));
    assert!(d.message.starts_with("cannot read file: "), "{}", d.message);
}

#[test]
fn shipped_configs_compile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("gatehouse.toml")];
    let examples = std::fs::read_dir(root.join("examples"))
        .unwrap_or_else(|e| panic!("reading examples/: {e}"));
    for entry in examples.flatten() {
        if entry.path().extension().is_some_and(|e| e == "toml") {
            files.push(entry.path());
        }
    }
    assert!(files.len() >= 2, "no example configs found");
    for file in files {
        if let Err(e) = load(&file, &Metrics::default()) {
            panic!("{} does not compile:\n{e}", file.display());
        }
    }
}

#[test]
fn default_config_serves_a_welcome_page() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gatehouse.toml");
    let s = match load(&path, &Metrics::default()) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(s.listeners[0].listen.to_string(), "127.0.0.1:8080");
    assert_eq!(
        s.admin.as_ref().map(|a| a.listen.to_string()),
        Some("127.0.0.1:9901".into())
    );
    let route = s.router.find("localhost", b"/anything");
    match route.map(|r| &r.action) {
        Some(RouteAction::Respond(r)) => {
            assert_eq!(r.status, 200);
            assert!(std::str::from_utf8(&r.body).is_ok_and(|b| b.contains("/metrics")));
        }
        other => panic!("expected the welcome route, got {other:?}"),
    }
}

/// `[upstream.a]` with one server and `rest` after it; the keys start on line 6.
fn upstream_with(rest: &str) -> String {
    format!("{LISTENER}[upstream.a]\nservers = [\"127.0.0.1:9000\"]\n{rest}")
}

#[test]
fn resilience_keys_compile_into_their_settings() {
    use crate::balance::{Algorithm, HashKey};
    use crate::config::snapshot::{HealthCheckKind, ServerHost};
    let s = ok(&format!(
        "{LISTENER}[upstream.a]\n\
         servers = [\"127.0.0.1:9000\", {{ address = \"app.internal:9001\", backup = true, drain = true, max_conns = 3 }}]\n\
         balance = \"consistent_hash\"\nhash_key = \"cookie:sid\"\nsticky_cookie = \"GH\"\n\
         slow_start = \"30s\"\npanic_threshold = 50\nmax_conns = 9\nmax_pending = 4\nqueue_timeout = \"2s\"\n\
         [upstream.a.health_check]\npath = \"/hz\"\nexpect = [204, \"3xx\"]\ninterval = \"1s\"\ntimeout = \"500ms\"\nrise = 1\nfall = 4\n\
         [upstream.a.outlier]\nconsecutive_failures = 2\ncount_5xx = false\nbase_ejection = \"1s\"\nmax_ejection = \"1m\"\n\
         [upstream.a.retry]\nattempts = 4\nper_try_timeout = \"1s\"\nbudget = 5\nmin_per_second = 1\n"
    ));
    let a = s.upstream(UpstreamId(0));
    assert_eq!(
        a.balance.algorithm,
        Algorithm::ConsistentHash(HashKey::Cookie("sid".into()))
    );
    assert_eq!(a.balance.sticky_cookie.as_deref(), Some("GH"));
    assert_eq!(a.balance.slow_start, Duration::from_secs(30));
    assert_eq!(a.balance.panic_threshold, 0.5);
    assert_eq!(
        (a.queue.max_pending, a.queue.timeout),
        (4, Duration::from_secs(2))
    );
    assert_eq!(a.specs[0].max_conns, 9, "the upstream's default");
    assert_eq!(a.specs[1].max_conns, 3, "the server's own");
    assert!(a.specs[1].backup && a.specs[1].drain);
    assert_eq!(
        a.specs[1].host,
        ServerHost::Name {
            host: "app.internal".into(),
            port: 9001
        }
    );
    assert!(a.needs_resolver());
    assert_eq!(
        a.targets.load().servers.len(),
        1,
        "names join once resolved"
    );
    let h = a.health_check.as_ref().expect("a health check");
    assert_eq!((h.rise, h.fall), (1, 4));
    assert_eq!(h.timeout, Duration::from_millis(500));
    match &h.kind {
        HealthCheckKind::Http { path, host, expect } => {
            assert_eq!(path, "/hz");
            assert_eq!(host, &None);
            assert!(expect.contains(204) && expect.contains(302) && !expect.contains(200));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.outlier.consecutive_failures, 2);
    assert!(!a.outlier.count_5xx);
    assert_eq!(a.outlier.max_ejection, Duration::from_secs(60));
    assert_eq!(a.retry.attempts, 4);
    assert_eq!(a.retry.per_try_timeout, Some(Duration::from_secs(1)));
    assert_eq!(a.retry.budget_ratio, 0.05);
}

#[test]
fn resilience_defaults() {
    let s = ok(&upstream_with(""));
    let a = s.upstream(UpstreamId(0));
    assert_eq!(a.balance.algorithm, crate::balance::Algorithm::RoundRobin);
    assert!(a.health_check.is_none());
    assert_eq!(a.outlier.consecutive_failures, 5);
    assert_eq!(a.outlier.base_ejection, Duration::from_secs(10));
    assert_eq!(a.retry.attempts, 3);
    assert_eq!(a.retry.per_try_timeout, None);
    assert_eq!(a.retry.budget_ratio, 0.2);
    assert_eq!(a.queue.max_pending, 0);
    assert_eq!(s.resolver.min_ttl, Duration::from_secs(1));
    assert!(s.resolver.nameservers.is_empty());
}

#[test]
fn resilience_key_errors_point_at_the_value() {
    assert_one_error(
        &upstream_with("balance = \"fastest\"\n"),
        "6:11",
        "unknown balance",
    );
    assert_one_error(
        &upstream_with("balance = \"consistent_hash\"\n"),
        "6:11",
        "consistent_hash needs `hash_key`",
    );
    assert_one_error(
        &upstream_with("hash_key = \"path\"\n"),
        "6:12",
        "only applies with balance = \"consistent_hash\"",
    );
    assert_one_error(
        &upstream_with("balance = \"consistent_hash\"\nhash_key = \"ip\"\n"),
        "7:12",
        "bad hash_key",
    );
    assert_one_error(
        &upstream_with("sticky_cookie = \"a;b\"\n"),
        "6:17",
        "bad cookie name",
    );
    assert_one_error(
        &upstream_with("panic_threshold = 101\n"),
        "6:19",
        "between 0 and 100",
    );
    assert_one_error(
        &upstream_with("[upstream.a.health_check]\ntype = \"icmp\"\n"),
        "7:8",
        "expected \"http\" or \"tcp\"",
    );
    assert_one_error(
        &upstream_with("[upstream.a.health_check]\ntype = \"tcp\"\npath = \"/x\"\n"),
        "8:8",
        "no effect with type = \"tcp\"",
    );
    assert_one_error(
        &upstream_with("[upstream.a.health_check]\nexpect = [\"1xx\"]\n"),
        "7:11",
        "final statuses",
    );
    assert_one_error(
        &upstream_with("[upstream.a.health_check]\nexpect = [\"9xx\"]\n"),
        "7:11",
        "bad status",
    );
    assert_one_error(
        &upstream_with("[upstream.a.health_check]\ninterval = \"1s\"\ntimeout = \"2s\"\n"),
        "6:1",
        "not be longer than its interval",
    );
    assert_one_error(
        &upstream_with("[upstream.a.outlier]\nbase_ejection = \"1m\"\nmax_ejection = \"10s\"\n"),
        "8:16",
        "at least base_ejection",
    );
    assert_one_error(
        &upstream_with("[upstream.a.retry]\nattempts = 0\n"),
        "7:12",
        "between 1 and 10",
    );
    assert_one_error(
        &upstream_with("[upstream.a.retry]\nper_try_timeout = \"2m\"\n"),
        "7:19",
        "longer than the response_header timeout",
    );
    assert_one_error(
        &format!(
            "{LISTENER}[upstream.a]\nservers = [{{ address = \"127.0.0.1:1\", backup = true }}]\n"
        ),
        "5:11",
        "only backup servers",
    );
    assert_one_error(
        &format!("{LISTENER}[resolver]\nmin_ttl = \"10m\"\n"),
        "5:11",
        "must be at least min_ttl",
    );
    assert_one_error(
        &format!("{LISTENER}[resolver]\nnameservers = [\"dns.local\"]\n"),
        "5:16",
        "bad name server",
    );
}

#[test]
fn reload_watch_is_off_by_default_and_its_interval_needs_it() {
    assert_eq!(ok(LISTENER).watch, None);
    let on = ok(&format!("{LISTENER}[reload]\nwatch = true\n"));
    assert_eq!(on.watch, Some(std::time::Duration::from_secs(1)));
    let every = ok(&format!(
        "{LISTENER}[reload]\nwatch = true\ninterval = \"250ms\"\n"
    ));
    assert_eq!(every.watch, Some(std::time::Duration::from_millis(250)));
    assert_one_error(
        &format!("{LISTENER}[reload]\ninterval = \"5s\"\n"),
        "5:12",
        "no effect without watch = true",
    );
    assert_one_error(
        &format!("{LISTENER}[reload]\nwatch = true\ninterval = \"0s\"\n"),
        "6:12",
        "",
    );
}

#[test]
fn http2_defaults_are_on_without_a_table() {
    let s = ok(LISTENER);
    let h = s.http2;
    assert_eq!(h.max_concurrent_streams, 100);
    assert_eq!(h.max_header_list_size, 32 * 1024);
    assert_eq!(h.stream_window, 256 * 1024);
    assert_eq!(h.connection_window, 1024 * 1024);
    assert_eq!(h.max_pending_resets, 20);
    assert_eq!(h.max_client_resets, 100);
    assert_eq!(h.max_local_error_resets, 200);
    assert_eq!(h.max_control_frames, 500);
    assert_eq!(h.send_timeout, Duration::from_secs(60));
    // A plain listener does not take h2c unless it says so.
    assert!(!s.listeners[0].http2);
    assert!(ok(&format!("{LISTENER}http2 = true\n")).listeners[0].http2);
}

#[test]
fn http2_values_are_checked_where_they_are() {
    let text = format!(
        "{LISTENER}[http2]\nmax_concurrent_streams = 0\nstream_window = 100\n\
         connection_window = \"4GiB\"\nmax_header_list_size = \"1GiB\"\nsend_timeout = \"0s\"\n\
         max_control_frames = -1\nmax_streams = 5\n"
    );
    let errors = errors(&text);
    assert_eq!(errors.len(), 7, "{errors:#?}");
    assert!(errors[0].starts_with("5:26: http2.max_concurrent_streams must be between 1 and 10000"));
    assert!(errors[1].starts_with("6:17: http2.stream_window must be at least 65535"));
    assert!(errors[2].starts_with("7:21: http2.connection_window must be below 2GiB"));
    assert!(errors[3].starts_with("8:24: http2.max_header_list_size must be at most 16MiB"));
    assert!(errors[4].starts_with("9:16: duration must be > 0"));
    assert!(errors[5].starts_with("10:22: http2.max_control_frames must be between"));
    assert!(
        errors[6].starts_with("11:1: unknown field `max_streams`"),
        "{}",
        errors[6]
    );
}

#[test]
fn upstream_protocol_is_checked() {
    let up = |p: &str| {
        format!("{LISTENER}[upstream.a]\nservers = [\"127.0.0.1:1\"]\nprotocol = \"{p}\"\n")
    };
    use super::snapshot::UpstreamProtocol;
    assert_eq!(ok(&up("h2c")).upstreams[0].protocol, UpstreamProtocol::H2c);
    assert_eq!(
        ok(&up("http1")).upstreams[0].protocol,
        UpstreamProtocol::Http1
    );
    let h2 = format!("{}tls = {{ verify = false }}\n", up("h2"));
    assert_eq!(ok(&h2).upstreams[0].protocol, UpstreamProtocol::H2);
    assert!(ok(&h2).upstreams[0].tls.is_some());
    assert_one_error(
        &format!("{}tls = false\n", up("h2")),
        "7:7",
        "for cleartext HTTP/2 use protocol = \"h2c\"",
    );
    assert_one_error(
        &format!("{}tls = {{ verify = false }}\n", up("h2c")),
        "7:7",
        "for HTTP/2 over TLS use protocol = \"h2\"",
    );
    // HTTP checks of HTTP/2 upstreams speak HTTP/2.
    ok(&format!("{}health_check = {{ path = \"/\" }}\n", up("h2c")));
    assert_one_error(&up("spdy"), "6:12", "unknown protocol \"spdy\"");
}
