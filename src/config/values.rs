//! Parsers for the config's small value formats: durations, sizes, names, host patterns, addresses.
//!
//! Neighbours: `compile.rs` calls these on each value of the file form and attaches the value's
//! position to the error. Each error message says what was expected, since the user reads it
//! without the docs open.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::{DurationValue, SizeValue, StatusValue};
use super::snapshot::{HostMatch, ServerHost};
use crate::balance::HashKey;

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
pub fn server_addr(value: &str) -> Result<ServerHost, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!(
                "server address {value:?} has port 0: give the port the server listens on"
            ));
        }
        return Ok(ServerHost::Addr(addr));
    }
    let bad = || {
        format!(
            "bad server address {value:?}: expected IP:port or name:port, such as \"127.0.0.1:9000\", \"[::1]:9000\" or \"app.internal:9000\""
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    // A name has a letter somewhere; "1.2.3:80" is a mistyped address, not a name.
    let is_name = host.bytes().any(|b| b.is_ascii_alphabetic())
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !is_name {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(0) => Err(format!(
            "server address {value:?} has port 0: give the port the server listens on"
        )),
        Ok(port) => Ok(ServerHost::Name {
            host: host.to_ascii_lowercase(),
            port,
        }),
        Err(_) => Err(bad()),
    }
}

/// A name server: `"IP"` (port 53) or `"IP:port"`.
pub fn nameserver(value: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = value.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    value.parse::<SocketAddr>().map_err(|_| {
        format!("bad name server {value:?}: expected an IP or IP:port, such as \"127.0.0.1:53\"")
    })
}

/// A cookie name is an RFC 6265 token: visible ASCII without separators.
pub fn cookie_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad cookie name {value:?}: use letters, digits and !#$%&'*+-.^_`|~ only"
        ))
    }
}

/// A header field name (an RFC 9110 token) that Gatehouse may set on requests itself: not one
/// that frames the message, routes it, or that Gatehouse already writes.
pub fn header_name(value: &str) -> Result<(), String> {
    if !is_token(value) {
        return Err(format!(
            "bad header name {value:?}: use letters, digits and !#$%&'*+-.^_`|~ only"
        ));
    }
    const RESERVED: [&str; 12] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
    ];
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(value)) {
        return Err(format!(
            "{value:?} cannot be used here: Gatehouse or HTTP itself gives that header its meaning"
        ));
    }
    Ok(())
}

fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `"client_ip"`, `"path"`, `"header:NAME"` or `"cookie:NAME"`.
pub fn hash_key(value: &str) -> Result<HashKey, String> {
    let bad = || {
        format!(
            "bad hash_key {value:?}: expected \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\""
        )
    };
    match value.split_once(':') {
        None if value == "client_ip" => Ok(HashKey::ClientIp),
        None if value == "path" => Ok(HashKey::Path),
        None => Err(bad()),
        Some(("header", name)) => {
            if is_token(name) {
                Ok(HashKey::Header(name.to_ascii_lowercase().into()))
            } else {
                Err(format!("bad header name {name:?} in hash_key"))
            }
        }
        Some(("cookie", name)) => {
            cookie_name(name)?;
            Ok(HashKey::Cookie(name.into()))
        }
        Some(_) => Err(bad()),
    }
}

/// `200`, `"2xx"` or `"200-299"` as an inclusive range of status codes.
pub fn status_range(value: &StatusValue) -> Result<(u16, u16), String> {
    let code = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("status {n} is not between 100 and 599"))
    };
    let text = match value {
        StatusValue::Code(n) => return code(*n).map(|c| (c, c)),
        StatusValue::Text(t) => t,
    };
    let bad = || format!("bad status {text:?}: expected 200, \"2xx\" or \"200-299\"");
    if let Some(class) = text.strip_suffix("xx") {
        let class: i64 = class.parse().map_err(|_| bad())?;
        if !(1..=5).contains(&class) {
            return Err(bad());
        }
        let lo = u16::try_from(class * 100).map_err(|_| bad())?;
        return Ok((lo, lo + 99));
    }
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (lo, hi),
        None => (text.as_str(), text.as_str()),
    };
    let lo = code(lo.trim().parse().map_err(|_| bad())?)?;
    let hi = code(hi.trim().parse().map_err(|_| bad())?)?;
    if lo > hi {
        return Err(format!(
            "bad status range {text:?}: the low end comes first"
        ));
    }
    Ok((lo, hi))
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
        assert_eq!(
            server_addr("Backend.internal:80"),
            Ok(ServerHost::Name {
                host: "backend.internal".into(),
                port: 80
            })
        );
        assert!(server_addr("backend.internal").is_err());
        assert!(server_addr("backend.internal:0").is_err());
        assert!(server_addr("bad_name:80").is_err());
        assert!(server_addr("1.2.3:80").is_err());
    }

    #[test]
    fn hash_keys_cookies_and_statuses() {
        assert_eq!(hash_key("client_ip"), Ok(HashKey::ClientIp));
        assert_eq!(
            hash_key("header:X-User"),
            Ok(HashKey::Header("x-user".into()))
        );
        assert_eq!(hash_key("cookie:sid"), Ok(HashKey::Cookie("sid".into())));
        assert!(hash_key("header:").is_err());
        assert!(hash_key("ip").is_err());
        assert!(cookie_name("GH_SERVER").is_ok());
        assert!(cookie_name("a;b").is_err());
        assert_eq!(status_range(&StatusValue::Code(204)), Ok((204, 204)));
        assert_eq!(
            status_range(&StatusValue::Text("2xx".into())),
            Ok((200, 299))
        );
        assert_eq!(
            status_range(&StatusValue::Text("200-302".into())),
            Ok((200, 302))
        );
        assert!(status_range(&StatusValue::Text("302-200".into())).is_err());
        assert!(status_range(&StatusValue::Code(99)).is_err());
        assert!(status_range(&StatusValue::Text("9xx".into())).is_err());
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
