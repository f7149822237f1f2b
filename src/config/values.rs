//! Parsers for the config's small value formats: durations, sizes, names, host patterns, addresses.
//!
//! Neighbours: `compile.rs` calls these on each value of the file form and attaches the value's
//! position to the error. Each error message says what was expected, since the user reads it
//! without the docs open.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::{DurationValue, SizeValue};
use super::snapshot::HostMatch;

const DURATION_FORMAT: &str =
    r#"expected a duration such as "500ms", "10s", "5m", "1h", or an integer number of seconds"#;
const SIZE_FORMAT: &str =
    r#"expected a size such as "16KiB", "1MiB", "1GiB", or an integer number of bytes"#;

/// `"500ms"`, `"10s"`, `"5m"`, `"1h"`, or an integer number of seconds; always > 0, because a
/// zero timeout would fail every request rather than disable the timeout.
pub fn duration(value: &DurationValue) -> Result<Duration, String> {
    let text = match value {
        DurationValue::Seconds(n) if *n > 0 => return Ok(Duration::from_secs(n.unsigned_abs())),
        DurationValue::Seconds(n) => return Err(format!("duration must be > 0, got {n}")),
        DurationValue::Text(text) => text,
    };
    let bad = || format!("bad duration {text:?}: {DURATION_FORMAT}");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = n
        .checked_mul(unit_ms)
        .ok_or_else(|| format!("duration {text:?} is too large"))?;
    if ms == 0 {
        return Err(format!("duration must be > 0, got {text:?}"));
    }
    Ok(Duration::from_millis(ms))
}

/// Integer bytes, or a number with a binary-multiple suffix: `k`/`kb`/`kib`, `m`/`mb`/`mib`,
/// `g`/`gb`/`gib` (any case; "KB" means 1024 here, as in nginx). Always > 0.
pub fn size(value: &SizeValue) -> Result<u64, String> {
    let text = match value {
        SizeValue::Bytes(n) if *n > 0 => return Ok(n.unsigned_abs()),
        SizeValue::Bytes(n) => return Err(format!("size must be > 0, got {n}")),
        SizeValue::Text(text) => text,
    };
    let bad = || format!("bad size {text:?}: {SIZE_FORMAT}");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let bytes = n
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("size must be > 0, got {text:?}"));
    }
    Ok(bytes)
}

/// Names of listeners, upstreams and routes appear in metric labels and log lines, so they are
/// kept to characters that need no quoting there.
pub fn name(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad {what} name {value:?}: use letters, digits, '_' and '-' only"
        ))
    }
}

/// `app.example.com` (exact) or `*.example.com` (any name ending in `.example.com`, not the bare
/// `example.com`); lower-cased, since host names compare case-insensitively (RFC 9110 §4.2.3).
pub fn host(value: &str) -> Result<HostMatch, String> {
    let lower = value.to_ascii_lowercase();
    if lower == "*" {
        return Err("host \"*\" is not a pattern: leave `host` out to match every host".into());
    }
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    if name.contains(':') {
        return Err(format!(
            "host {value:?} must not include a port: routes match every listener"
        ));
    }
    if name.contains('*') {
        return Err(format!(
            "bad host {value:?}: only a leading \"*.\" wildcard is supported, as in \"*.example.com\""
        ));
    }
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !labels_ok {
        return Err(format!(
            "bad host {value:?}: expected a name such as \"app.example.com\" or \"*.example.com\" \
             (letters, digits, '-' and '.')"
        ));
    }
    Ok(if wildcard {
        // `*.example.com` -> `.example.com`.
        HostMatch::Suffix(lower[1..].into())
    } else {
        HostMatch::Exact(lower.into_boxed_str())
    })
}

/// A route's path prefix. The router compares it with the request path without the query, so a
/// `?` or `#` could never match, and whitespace or control characters cannot occur in a request
/// target (RFC 9112 §3.2).
pub fn path(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("path {value:?} must start with '/'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| *c == '?' || *c == '#' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "path {value:?} must not contain {c:?}: it is a prefix of the request path, without the query"
        ));
    }
    Ok(())
}

/// A listening address: `IP:port`, `[IPv6]:port`; port 0 picks a free port.
pub fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("bad listen address {value:?}: expected IP:port, such as \"127.0.0.1:8080\" or \"[::1]:8080\"")
    })
}

/// An upstream server's address: `IP:port` with a real port.
pub fn server_addr(value: &str) -> Result<SocketAddr, String> {
    match value.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => Err(format!(
            "server address {value:?} has port 0: give the port the server listens on"
        )),
        Ok(addr) => Ok(addr),
        Err(_) => {
            let host = value.rsplit_once(':').map_or(value, |(host, _)| host);
            let is_name = !host.is_empty()
                && host.bytes().any(|b| b.is_ascii_alphabetic())
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if is_name {
                Err(format!(
                    "server address {value:?}: DNS names are not supported yet; use IP:port, such as \"127.0.0.1:9000\""
                ))
            } else {
                Err(format!(
                    "bad server address {value:?}: expected IP:port, such as \"127.0.0.1:9000\" or \"[::1]:9000\""
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dur(s: &str) -> Result<Duration, String> {
        duration(&DurationValue::Text(s.into()))
    }

    fn sz(s: &str) -> Result<u64, String> {
        size(&SizeValue::Text(s.into()))
    }

    #[test]
    fn durations() {
        assert_eq!(dur("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(dur("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(dur("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(dur("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            duration(&DurationValue::Seconds(7)),
            Ok(Duration::from_secs(7))
        );
        for bad in ["", "10", "s", "1.5s", "-1s", "10 s", "10sec", "1d", "0s"] {
            assert!(dur(bad).is_err(), "{bad:?} accepted");
        }
        assert!(duration(&DurationValue::Seconds(0)).is_err());
        assert!(dur("99999999999999999999h").is_err());
        assert!(dur("10x").is_err_and(|e| e.contains("expected a duration")));
    }

    #[test]
    fn sizes() {
        assert_eq!(sz("16KiB"), Ok(16 * 1024));
        assert_eq!(sz("16KB"), Ok(16 * 1024));
        assert_eq!(sz("16k"), Ok(16 * 1024));
        assert_eq!(sz("1MiB"), Ok(1 << 20));
        assert_eq!(sz("1m"), Ok(1 << 20));
        assert_eq!(sz("1gib"), Ok(1 << 30));
        assert_eq!(sz("512"), Ok(512));
        assert_eq!(size(&SizeValue::Bytes(10)), Ok(10));
        for bad in ["", "k", "1.5k", "1 KiB", "1TiB", "0k", "-1"] {
            assert!(sz(bad).is_err(), "{bad:?} accepted");
        }
        assert!(size(&SizeValue::Bytes(0)).is_err());
    }

    #[test]
    fn hosts() {
        assert_eq!(
            host("App.Example.COM"),
            Ok(HostMatch::Exact("app.example.com".into()))
        );
        assert_eq!(
            host("*.example.com"),
            Ok(HostMatch::Suffix(".example.com".into()))
        );
        assert_eq!(host("localhost"), Ok(HostMatch::Exact("localhost".into())));
        for bad in [
            "",
            "*",
            "a.*.com",
            "*example.com",
            "example.com:80",
            "exa mple.com",
            "a..b",
            ".a",
            "a.",
            "ex_ample.com",
        ] {
            assert!(host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn addresses() {
        assert!(listen_addr("127.0.0.1:0").is_ok());
        assert!(listen_addr("[::1]:8080").is_ok());
        assert!(listen_addr("localhost:8080").is_err());
        assert!(listen_addr("127.0.0.1").is_err());
        assert!(server_addr("127.0.0.1:0").is_err());
        assert!(server_addr("backend.internal:80")
            .is_err_and(|e| e.contains("DNS names are not supported yet")));
        assert!(server_addr("1.2.3:80").is_err_and(|e| !e.contains("DNS names")));
    }

    #[test]
    fn names_and_paths() {
        assert!(name("route", "api_v2-x").is_ok());
        assert!(name("route", "").is_err());
        assert!(name("route", "a b").is_err());
        assert!(path("/api/").is_ok());
        assert!(path("api").is_err());
        assert!(path("/a?b").is_err());
    }
}
