//! The `gatehouse` binary's `--version` and `check`.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::proxy::write_config;

const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

/// A config `check` accepts. Line numbers below refer to this layout.
const VALID: &str = r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"

[upstream.app]
servers = ["127.0.0.1:9000", { address = "127.0.0.1:9001", weight = 3 }]

[[route]]
path = "/"
upstream = "app"
"#;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {BIN} {args:?}: {e}"))
}

/// Runs `gatehouse check -c FILE` on `toml`; returns (exit code, stdout + stderr, path).
fn check(toml: &str) -> (Option<i32>, String, String) {
    let file = write_config(toml);
    let path = file.path().display().to_string();
    let out = run(&["check", "-c", &path]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, path)
}

/// The `FILE:LINE:COL: message` lines of `output`, as (line, col, message).
fn diagnostics(output: &str, path: &str) -> Vec<(usize, usize, String)> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(path)?.strip_prefix(':')?;
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let col = parts.next()?.parse().ok()?;
            let message = parts.next()?.strip_prefix(' ')?.to_owned();
            Some((line, col, message))
        })
        .collect()
}

/// Checks `toml`, expecting exit code 1 and a diagnostic at `line` with a column in `cols`
/// (empty `cols`: any column) whose message mentions `mentions`.
fn assert_diagnostic(toml: &str, line: usize, cols: &[usize], mentions: &str) {
    let (code, output, path) = check(toml);
    assert_eq!(code, Some(1), "exit code; output:\n{output}");
    let found = diagnostics(&output, &path);
    assert!(
        found.iter().any(|(l, c, m)| *l == line
            && (cols.is_empty() || cols.contains(c))
            && !m.trim().is_empty()
            && m.to_lowercase().contains(&mentions.to_lowercase())),
        "expected {path}:{line}:{cols:?}: <message mentioning {mentions:?}>; got:\n{output}"
    );
}

#[test]
fn version_prints_the_package_version() {
    let out = run(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {stdout:?}"
    );
}

#[test]
fn check_accepts_a_valid_config() {
    let (code, output, _) = check(VALID);
    assert_eq!(code, Some(0), "output:\n{output}");
}

#[test]
fn check_accepts_the_documented_example() {
    // Every key of the documented format, at once.
    let toml = r#"workers = 2

[log]
access = "stderr"
format = "json"

[admin]
listen = "127.0.0.1:0"

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
listen = "127.0.0.1:0"

[upstream.app]
servers = ["127.0.0.1:9000", { address = "127.0.0.1:9001", weight = 3 }]
keepalive = 32
timeouts = { connect = "2s", response_header = "1s", read = "30s", write = "30s", idle = "60s" }

[[route]]
name = "api"
host = "app.example.com"
path = "/api/"
upstream = "app"
max_body_bytes = "10MiB"
timeouts = { response_header = "500ms" }

[[route]]
host = "*.example.com"
path = "/"
respond = { status = 200, body = "hello\n" }
"#;
    let (code, output, _) = check(toml);
    assert_eq!(code, Some(0), "output:\n{output}");
}

#[test]
fn check_reports_an_unknown_key() {
    let toml = VALID.replacen(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\ncolour = \"blue\"\n",
        1,
    );
    // line 4: colour = "blue"
    assert_diagnostic(&toml, 4, &[1], "colour");
}

#[test]
fn check_reports_an_unknown_upstream_in_a_route() {
    let toml = VALID.replace("upstream = \"app\"", "upstream = \"nope\"");
    // line 10: upstream = "nope"; the key is at column 1, the value at column 12.
    assert_diagnostic(&toml, 10, &[1, 12], "");
}

#[test]
fn check_reports_a_bad_duration() {
    let toml = VALID.replace(
        "weight = 3 }]\n",
        "weight = 3 }]\ntimeouts = { connect = \"5 parsecs\" }\n",
    );
    // line 7: timeouts = { connect = "5 parsecs" }; `connect` at column 14, its value at 24.
    assert_diagnostic(&toml, 7, &[14, 24], "");
}

#[test]
fn check_reports_a_duplicate_listener_name() {
    let toml = VALID.replacen(
        "\n[upstream.app]",
        "\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\n[upstream.app]",
        1,
    );
    // line 6: the second name = "web"; the key at column 1, the value at column 8.
    assert_diagnostic(&toml, 6, &[1, 8], "");
}

#[test]
fn check_reports_a_toml_syntax_error() {
    let toml = VALID.replace("path = \"/\"", "path = \"/");
    // line 9: path = "/   (unterminated string)
    assert_diagnostic(&toml, 9, &[], "");
}

#[test]
fn check_reports_every_problem() {
    let toml = r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"

[upstream.app]
servers = ["127.0.0.1:9000"]

[[route]]
path = "/a/"
upstream = "missing_one"

[[route]]
path = "/b/"
upstream = "missing_two"
"#;
    let (code, output, path) = check(toml);
    assert_eq!(code, Some(1), "output:\n{output}");
    let found = diagnostics(&output, &path);
    for line in [6, 14, 18] {
        assert!(
            found.iter().any(|(l, _, _)| *l == line),
            "no diagnostic for line {line}; got:\n{output}"
        );
    }
}

#[test]
fn check_fails_on_a_missing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.toml");
    let out = run(&["check", "-c", &path.display().to_string()]);
    assert!(!out.status.success(), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&Path::new(&path).display().to_string()),
        "the error names the file: {text}"
    );
}

#[test]
fn check_reports_every_unknown_key_along_with_other_problems() {
    // An unknown key must not hide the problems after it: a user fixing a config file wants
    // the whole list in one run.
    let toml = r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
colour = "blue"

[upstream.app]
servers = ["127.0.0.1:9000"]
flavour = "vanilla"

[[route]]
path = "/"
upstream = "nope"
"#;
    let (code, output, path) = check(toml);
    assert_eq!(code, Some(1), "output:\n{output}");
    let found = diagnostics(&output, &path);
    for (line, col) in [(4, 1), (8, 1), (12, 12)] {
        assert!(
            found.iter().any(|(l, c, _)| (*l, *c) == (line, col)),
            "no diagnostic at {line}:{col}; got:\n{output}"
        );
    }
}
