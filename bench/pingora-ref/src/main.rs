//! pingora-ref: a minimal HTTP/1.1 reverse proxy built on Cloudflare's `pingora`,
//! used only as a benchmark peer for Gatehouse (see README.md).
//!
//! Every request goes to the one upstream, over pingora's upstream keep-alive pool.
//! With `--hosts N`, an in-memory table of N host routes is consulted on every request
//! (the "large in-memory state" run of the benchmark).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::exit;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

const USAGE: &str = "\
pingora-ref: minimal pingora reverse proxy (benchmark peer for Gatehouse)

USAGE:
    pingora-ref --listen ADDR:PORT --upstream ADDR:PORT [OPTIONS]

OPTIONS:
    --listen ADDR:PORT      address to accept plain HTTP/1.1 on (required)
    --upstream ADDR:PORT    the one upstream every request is forwarded to (required)
    --threads N             worker threads of the proxy service (pingora `threads`) [default: 1]
    --hosts N               hold N host routes h<i>.example.com in memory and look the
                            request's Host up on every request [default: 0]
    --keepalive-pool N      idle upstream connections kept per worker thread
                            (pingora `upstream_keepalive_pool_size`) [default: 1024]
    -h, --help              print this help

Logging is off unless RUST_LOG is set (e.g. RUST_LOG=info).
SIGINT exits at once; SIGTERM exits without a grace period.";

struct Args {
    listen: String,
    upstream: SocketAddr,
    threads: usize,
    hosts: usize,
    keepalive_pool: usize,
}

fn die(msg: &str) -> ! {
    eprintln!("pingora-ref: {msg}\n\n{USAGE}");
    exit(2)
}

fn parse_num(flag: &str, v: &str) -> usize {
    v.parse()
        .unwrap_or_else(|_| die(&format!("{flag} expects a non-negative integer, got {v:?}")))
}

fn parse_args() -> Args {
    let mut listen = None;
    let mut upstream = None;
    let mut threads = 1usize;
    let mut hosts = 0usize;
    let mut keepalive_pool = 1024usize;

    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| die(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--listen" => listen = Some(value()),
            "--upstream" => {
                let v = value();
                let addr = v
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .unwrap_or_else(|| die(&format!("cannot resolve --upstream {v:?}")));
                upstream = Some(addr);
            }
            "--threads" => threads = parse_num("--threads", &value()),
            "--hosts" => hosts = parse_num("--hosts", &value()),
            "--keepalive-pool" => keepalive_pool = parse_num("--keepalive-pool", &value()),
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    if threads == 0 {
        die("--threads must be at least 1");
    }
    Args {
        listen: listen.unwrap_or_else(|| die("--listen is required")),
        upstream: upstream.unwrap_or_else(|| die("--upstream is required")),
        threads,
        hosts,
        keepalive_pool,
    }
}

struct RefProxy {
    /// Host name -> upstream. Holds `--hosts` entries; all point at the one upstream.
    routes: HashMap<String, Arc<HttpPeer>>,
    /// Where requests for hosts not in `routes` go (the same upstream).
    default_peer: Arc<HttpPeer>,
}

impl RefProxy {
    fn route(&self, session: &Session) -> &Arc<HttpPeer> {
        let req = session.req_header();
        let host = req
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or("");
        // Strip a port (`name:8083`); IPv6 literals (`[::1]:8083`) keep their brackets.
        let name = match host.rfind(':') {
            Some(i) if !host[i..].contains(']') => &host[..i],
            _ => host,
        };
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.routes.get(name.to_ascii_lowercase().as_str())
        } else {
            self.routes.get(name)
        };
        found.unwrap_or(&self.default_peer)
    }
}

#[async_trait]
impl ProxyHttp for RefProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // A clone of a pre-built peer: no DNS, same pool key every time, so pingora's
        // connection pool reuses idle upstream connections.
        Ok(Box::new(HttpPeer::clone(self.route(session))))
    }

    // `logging` is left at its default (a no-op): no access log.
}

fn main() {
    let args = parse_args();

    // Quiet by default: pingora logs through the `log` crate, and with no logger installed
    // nothing is printed. RUST_LOG turns a stderr logger on for debugging.
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::init();
    }

    let default_peer = Arc::new(HttpPeer::new(args.upstream, false, String::new()));

    let mut routes = HashMap::with_capacity(args.hosts);
    for i in 0..args.hosts {
        routes.insert(format!("h{i}.example.com"), Arc::clone(&default_peer));
    }

    let conf = ServerConf {
        threads: args.threads,
        upstream_keepalive_pool_size: args.keepalive_pool,
        // Fast exit on SIGTERM: no grace period, do not wait for runtimes.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        daemon: false,
        ..ServerConf::default()
    };

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = http_proxy_service(
        &server.configuration,
        RefProxy {
            routes,
            default_peer,
        },
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);

    server.run_forever();
}
