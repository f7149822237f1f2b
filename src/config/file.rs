//! The config file as the user writes it: the serde schema of `gatehouse.toml`.
//!
//! Neighbours: `mod.rs` parses TOML into these types, `compile.rs` validates them into a
//! `snapshot::Snapshot`. Nothing here is checked beyond its TOML type: every value a later check
//! can reject is kept as `Spanned<T>`, so that `compile.rs` can point at it. Every table denies
//! unknown keys, so a misspelt key is an error instead of a silently ignored setting; `keys.rs`
//! finds them all first (a new nested table needs an entry in its `ROOT`, which a test enforces).
//! `docs/config.md` documents every key; keep the two in step.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub workers: Option<Spanned<i64>>,
    #[serde(default)]
    pub log: LogSection,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub timeouts: GlobalTimeouts,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub resolver: ResolverSection,
    #[serde(default)]
    pub reload: ReloadSection,
    #[serde(default)]
    pub http2: Http2Section,
    #[serde(default)]
    pub listener: Vec<Spanned<ListenerSection>>,
    /// Keyed by name; `compile.rs` restores file order from the key spans.
    #[serde(default)]
    pub upstream: BTreeMap<Spanned<String>, UpstreamSection>,
    /// Spanned so that a check about the route as a whole can point at its `[[route]]` header.
    #[serde(default)]
    pub route: Vec<Spanned<RouteSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub access: Option<Spanned<AccessValue>>,
    pub format: Option<Spanned<String>>,
}

/// `access = "stdout" | "stderr" | "<path>" | false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessValue {
    Off,
    Target(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalTimeouts {
    pub client_header: Option<Spanned<DurationValue>>,
    pub client_body: Option<Spanned<DurationValue>>,
    pub client_idle: Option<Spanned<DurationValue>>,
    pub connect: Option<Spanned<DurationValue>>,
    pub response_header: Option<Spanned<DurationValue>>,
    pub upstream_read: Option<Spanned<DurationValue>>,
    pub upstream_write: Option<Spanned<DurationValue>>,
    pub upstream_idle: Option<Spanned<DurationValue>>,
    pub tunnel_idle: Option<Spanned<DurationValue>>,
    pub shutdown_grace: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_header_bytes: Option<Spanned<SizeValue>>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_uri_bytes: Option<Spanned<SizeValue>>,
    pub max_body_bytes: Option<Spanned<SizeValue>>,
    pub max_connections: Option<Spanned<i64>>,
}

/// DNS for servers given by name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverSection {
    /// `"IP:port"` or `"IP"` (port 53) of the name servers; absent: the system's
    /// (`/etc/resolv.conf`, and `/etc/hosts` first).
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub timeout: Option<Spanned<DurationValue>>,
    /// Bounds on how soon a name is resolved again, whatever its records' TTL says.
    pub min_ttl: Option<Spanned<DurationValue>>,
    pub max_ttl: Option<Spanned<DurationValue>>,
}

/// Reloading without a signal.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSection {
    /// Reload when the file's contents change.
    pub watch: Option<bool>,
    /// How often the file is looked at.
    pub interval: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub max_connections: Option<Spanned<i64>>,
    /// `{ cert = "...", key = "..." }`, or a list of them (SNI picks; the first is the default).
    pub tls: Option<Spanned<TlsValue>>,
    /// Client certificates (mTLS) on a TLS listener.
    pub client_auth: Option<Spanned<ClientAuthSection>>,
    /// Plain listener: also take cleartext HTTP/2 with prior knowledge (h2c). TLS listener:
    /// offer `h2` in ALPN (the default there).
    pub http2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthSection {
    /// PEM: the CAs whose client certificates are accepted.
    pub ca: Spanned<String>,
    /// `true` (the default): no certificate, no connection. `false`: asked for, not required.
    pub required: Option<bool>,
    /// The request header that carries the verified certificate's subject upstream.
    pub subject_header: Option<Spanned<String>>,
}

/// `[http2]`: HTTP/2 connection settings and the limits that fend off its known attacks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2Section {
    pub max_concurrent_streams: Option<Spanned<i64>>,
    pub max_header_list_size: Option<Spanned<SizeValue>>,
    pub stream_window: Option<Spanned<SizeValue>>,
    pub connection_window: Option<Spanned<SizeValue>>,
    pub max_pending_resets: Option<Spanned<i64>>,
    pub max_client_resets: Option<Spanned<i64>>,
    pub max_local_error_resets: Option<Spanned<i64>>,
    pub max_control_frames: Option<Spanned<i64>>,
    pub send_timeout: Option<Spanned<DurationValue>>,
}

#[derive(Debug)]
pub enum TlsValue {
    One(TlsCertSection),
    Many(Vec<Spanned<TlsCertSection>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertSection {
    /// PEM: the certificate, then its chain.
    pub cert: Spanned<String>,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub servers: Spanned<Vec<Spanned<ServerEntry>>>,
    /// `"http1"` (the default), `"h2c"` or `"h2"`.
    pub protocol: Option<Spanned<String>>,
    pub keepalive: Option<Spanned<i64>>,
    pub timeouts: Option<UpstreamTimeoutsSection>,
    /// `"round_robin"`, `"random"`, `"least_requests"`, `"peak_ewma"`, `"consistent_hash"`.
    pub balance: Option<Spanned<String>>,
    /// With `consistent_hash`: `"client_ip"`, `"path"`, `"header:NAME"`, `"cookie:NAME"`.
    pub hash_key: Option<Spanned<String>>,
    pub sticky_cookie: Option<Spanned<String>>,
    pub slow_start: Option<Spanned<DurationValue>>,
    /// Percent of primaries available below which health is ignored.
    pub panic_threshold: Option<Spanned<i64>>,
    /// Default `max_conns` of the upstream's servers.
    pub max_conns: Option<Spanned<i64>>,
    pub max_pending: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<DurationValue>>,
    pub health_check: Option<Spanned<HealthCheckSection>>,
    pub outlier: Option<OutlierSection>,
    pub retry: Option<RetrySection>,
    /// `true`, or a table of settings: connect to the servers over TLS.
    pub tls: Option<Spanned<UpstreamTlsValue>>,
}

#[derive(Debug)]
pub enum UpstreamTlsValue {
    Enabled(bool),
    Table(UpstreamTlsSection),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    pub verify: Option<bool>,
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// `"http"` (the default) or `"tcp"`.
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    /// Statuses that pass: `200`, `"2xx"`, `"200-299"`.
    pub expect: Option<Spanned<Vec<Spanned<StatusValue>>>>,
    pub interval: Option<Spanned<DurationValue>>,
    pub timeout: Option<Spanned<DurationValue>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub count_5xx: Option<bool>,
    pub base_ejection: Option<Spanned<DurationValue>>,
    pub max_ejection: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    pub attempts: Option<Spanned<i64>>,
    pub per_try_timeout: Option<Spanned<DurationValue>>,
    /// Percent of extra load retries may add.
    pub budget: Option<Spanned<i64>>,
    pub min_per_second: Option<Spanned<i64>>,
}

/// A status code (`200`) or a class or range of them (`"2xx"`, `"200-299"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusValue {
    Code(i64),
    Text(String),
}

/// A server is either `"IP:port"` or `{ address = "IP:port", weight = 3 }`.
#[derive(Debug)]
pub enum ServerEntry {
    /// The address alone; its position is the enclosing `Spanned`'s.
    Address(String),
    Table(ServerTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTable {
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub backup: Option<bool>,
    pub drain: Option<bool>,
    pub max_conns: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeoutsSection {
    pub connect: Option<Spanned<DurationValue>>,
    pub response_header: Option<Spanned<DurationValue>>,
    pub read: Option<Spanned<DurationValue>>,
    pub write: Option<Spanned<DurationValue>>,
    pub idle: Option<Spanned<DurationValue>>,
    pub tunnel_idle: Option<Spanned<DurationValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub path: Spanned<String>,
    pub upstream: Option<Spanned<String>>,
    pub respond: Option<Spanned<RespondSection>>,
    pub max_body_bytes: Option<Spanned<SizeValue>>,
    pub timeouts: Option<RouteTimeoutsSection>,
    pub access_log: Option<bool>,
    /// Lets a request whose body was already sent be tried again on another server.
    pub retry_with_body: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondSection {
    pub status: Spanned<i64>,
    pub body: Option<Spanned<String>>,
    pub content_type: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeoutsSection {
    pub client_body: Option<Spanned<DurationValue>>,
    pub response_header: Option<Spanned<DurationValue>>,
    pub upstream_read: Option<Spanned<DurationValue>>,
    pub upstream_write: Option<Spanned<DurationValue>>,
    pub tunnel_idle: Option<Spanned<DurationValue>>,
}

/// A duration as written: an integer (seconds) or a string such as `"500ms"`. Parsed, with its
/// position, in `compile.rs`, so that every bad value in the file is reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationValue {
    Seconds(i64),
    Text(String),
}

/// A size as written: an integer (bytes) or a string such as `"16KiB"`. Parsed in `compile.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeValue {
    Bytes(i64),
    Text(String),
}

// The hand-written impls below accept "this type or that type" without `#[serde(untagged)]`:
// untagged enums buffer the value, which loses the position that `Spanned` needs and replaces the
// error with "data did not match any variant".

impl<'de> Deserialize<'de> for AccessValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AccessValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"stdout\", \"stderr\", a file path, or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AccessValue, E> {
                if v {
                    Err(E::invalid_value(de::Unexpected::Bool(v), &self))
                } else {
                    Ok(AccessValue::Off)
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AccessValue, E> {
                Ok(AccessValue::Target(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "500ms", "10s", "5m", "1h", or an integer number of seconds"#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationValue, E> {
                Ok(DurationValue::Seconds(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue::Seconds(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationValue, E> {
                Ok(DurationValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a size such as "16KiB", "1MiB", "1GiB", or an integer number of bytes"#,
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for StatusValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StatusValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a status such as 200, "2xx" or "200-299""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusValue, E> {
                Ok(StatusValue::Code(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusValue, E> {
                Ok(StatusValue::Code(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusValue, E> {
                Ok(StatusValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for TlsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TlsValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a table { cert = "cert.pem", key = "key.pem" } or a list of them"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TlsValue, A::Error> {
                let one = TlsCertSection::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(TlsValue::One(one))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<TlsValue, A::Error> {
                let many = Vec::<Spanned<TlsCertSection>>::deserialize(
                    de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(TlsValue::Many(many))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for UpstreamTlsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UpstreamTlsValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"true, false, or a table such as { ca = "ca.pem" }"#)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<UpstreamTlsValue, E> {
                Ok(UpstreamTlsValue::Enabled(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UpstreamTlsValue, A::Error> {
                let table =
                    UpstreamTlsSection::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(UpstreamTlsValue::Table(table))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a server address "IP:port" or a table { address = "IP:port", weight = N }"#,
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ServerEntry, E> {
                Ok(ServerEntry::Address(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServerEntry, A::Error> {
                let table = ServerTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ServerEntry::Table(table))
            }
        }
        d.deserialize_any(V)
    }
}
