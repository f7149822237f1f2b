//! gh-load: the benchmark's own load generator.
//!
//! - `rate`: open-loop fixed-rate latency (latency counted from the intended
//!   send time, so coordinated omission cannot hide stalls);
//! - `hold`: open and hold many idle keep-alive connections (memory per connection);
//! - `first200`: time from spawning a proxy to its first 200.
//!
//! Every target must be a loopback address; every loop is bounded in count and time.

mod first200;
mod hold;
mod http;
mod rate;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load generator for the Gatehouse benchmark (loopback targets only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop fixed-rate run; writes latency percentiles and a CDF as JSON.
    Rate(rate::Args),
    /// Open N keep-alive connections, one request each, then hold them idle.
    Hold(hold::Args),
    /// Spawn CMD and time its first HTTP 200 on --url.
    First200(first200::Args),
}

/// Parses "10s", "500ms", "250us", "2m" or a bare number of seconds ("1.5").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us").or_else(|| s.strip_suffix("µs")) {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms)"))?;
    if !v.is_finite() || v < 0.0 || v * mult > 86_400.0 {
        return Err(format!("duration {s:?} out of range (0..24h)"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Rate(a) => rate::run(a),
        Cmd::Hold(a) => hold::run(a),
        Cmd::First200(a) => first200::run(a),
    };
    std::process::exit(code);
}
