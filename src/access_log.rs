//! One line per request, formatted and written on a dedicated thread, never on the request path.
//!
//! Neighbours: `proxy.rs` fills an `AccessEntry` when a response ends and hands it over with a
//! non-blocking send; when the writer falls behind, entries are dropped and counted in `metrics.rs`
//! rather than slowing requests down. `app.rs` starts the writer from the `[log]` settings.

use std::borrow::Cow;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::error::TrySendError;

use bytes::Bytes;
use serde::Serialize;

use crate::config::snapshot::{AccessTarget, LogFormat, LogSettings};
use crate::metrics::Metrics;

/// Entries that may wait for the writer. At a few hundred bytes each this bounds the backlog to a
/// few megabytes, and absorbs a burst of well over a second at the rates one writer sustains.
/// tokio's channel allocates its slots in small blocks as they fill, so an idle proxy pays
/// nothing for this headroom (std's `sync_channel` would allocate all of it up front).
const CHANNEL_CAPACITY: usize = 16384;

/// How long dropping the last handle waits for the writer to flush. Bounded so that a stuck
/// output (a full pipe nobody reads) cannot hang shutdown.
const FLUSH_ON_DROP_TIMEOUT: Duration = Duration::from_secs(5);

/// What one finished request left behind. Cheap to build: the byte fields are slices of the
/// request head that was already received (a reference-count bump, no copy).
#[derive(Debug, Clone)]
pub struct AccessEntry {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: Bytes,
    /// The request target as received (path and query).
    pub target: Bytes,
    /// `"HTTP/1.1"`, `"HTTP/1.0"`, `"HTTP/2.0"`; empty when the request line was not understood.
    pub protocol: &'static str,
    pub host: Bytes,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    pub duration: Duration,
    /// `None` for fixed responses and errors before a server was picked.
    pub upstream: Option<SocketAddr>,
    pub upstream_time: Option<Duration>,
    pub route: Option<std::sync::Arc<str>>,
}

/// A handle to the writer thread; clones share it. The default handle is disabled.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// `Option` only so that `Drop` can close the channel before waiting for the writer.
    tx: Option<tokio::sync::mpsc::Sender<AccessEntry>>,
    metrics: Arc<Metrics>,
    /// Disconnects when the writer thread has flushed and returned.
    done: Mutex<Receiver<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel tells the writer to drain, flush and stop; waiting here means the
        // last lines reach the file before the process exits.
        drop(self.tx.take());
        let done = self
            .done
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match done.recv_timeout(FLUSH_ON_DROP_TIMEOUT) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "access log writer did not finish flushing in time; lines may be lost"
                );
            }
        }
    }
}

impl AccessLog {
    /// Opens the output and starts the writer thread; with `access = off`, returns a disabled
    /// handle and starts nothing. Errors are those of opening the log file.
    pub fn start(settings: &LogSettings, metrics: Arc<Metrics>) -> io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match &settings.access {
            AccessTarget::Off => return Ok(AccessLog::default()),
            AccessTarget::Stdout => Box::new(io::stdout()),
            AccessTarget::Stderr => Box::new(io::stderr()),
            AccessTarget::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let format = settings.format;
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CAPACITY);
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("gatehouse-access-log".to_owned())
            .spawn(move || {
                write_loop(rx, BufWriter::with_capacity(64 * 1024, out), format);
                drop(done_tx);
            })?;
        Ok(AccessLog {
            inner: Some(Arc::new(Inner {
                tx: Some(tx),
                metrics,
                done: Mutex::new(done_rx),
            })),
        })
    }

    /// Queues one entry without blocking; drops and counts it when the writer is behind.
    pub fn log(&self, entry: AccessEntry) {
        let Some(inner) = &self.inner else { return };
        let Some(tx) = &inner.tx else { return };
        match tx.try_send(entry) {
            Ok(()) => {}
            // Disconnected means the writer died (it only stops when every handle is gone, so a
            // panic); counting those as dropped keeps the loss visible.
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                inner.metrics.access_log_entry_dropped();
            }
        }
    }

    /// False when access logging is off, so callers can skip building entries at all.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }
}

/// The writer thread: formats every entry into one reused buffer and flushes whenever the queue
/// is momentarily empty, so lines show up promptly under light load and batch under heavy load.
fn write_loop(
    mut rx: tokio::sync::mpsc::Receiver<AccessEntry>,
    mut out: BufWriter<Box<dyn Write + Send>>,
    format: LogFormat,
) {
    let mut line = Vec::with_capacity(512);
    let mut failing = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(entry) = next.take() {
            line.clear();
            match format {
                LogFormat::Text => format_text(&entry, &mut line),
                LogFormat::Json => format_json(&entry, &mut line),
            }
            note_result(out.write_all(&line), &mut failing);
            // Empty or disconnected both end the batch; the outer `recv` tells them apart.
            next = rx.try_recv().ok();
        }
        note_result(out.flush(), &mut failing);
    }
    note_result(out.flush(), &mut failing);
}

/// Reports a write error once when it starts and once when writes recover, instead of once per
/// line: a full disk would otherwise flood the error log as fast as requests arrive.
fn note_result(result: io::Result<()>, failing: &mut bool) {
    match result {
        Err(err) if !*failing => {
            *failing = true;
            tracing::error!(error = %err, "access log write failed; lines are being lost");
        }
        Ok(()) if *failing => {
            *failing = false;
            tracing::info!("access log writes recovered");
        }
        _ => {}
    }
}

/// Appends one text line (with its `\n`) in a combined-log-like layout:
/// `client - - [date] "METHOD target PROTOCOL" status bytes host=".." route=".." upstream=..
/// upstream_time=.. duration=..`.
pub fn format_text(entry: &AccessEntry, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, so the io::Results below carry nothing.
    let _ = write!(out, "{} - - [", entry.client);
    let (date, secs_of_day, _) = civil_time(entry.time);
    let _ = write!(
        out,
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000] \"",
        date.day,
        MONTHS[usize::from(date.month - 1)],
        date.year,
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    );
    escape_bytes(&entry.method, out);
    out.push(b' ');
    escape_bytes(&entry.target, out);
    if !entry.protocol.is_empty() {
        out.push(b' ');
        out.extend_from_slice(entry.protocol.as_bytes());
    }
    let _ = write!(out, "\" {} {} host=", entry.status, entry.bytes_sent);
    if entry.host.is_empty() {
        out.push(b'-');
    } else {
        out.push(b'"');
        escape_bytes(&entry.host, out);
        out.push(b'"');
    }
    out.extend_from_slice(b" route=");
    match &entry.route {
        Some(route) => {
            out.push(b'"');
            escape_bytes(route.as_bytes(), out);
            out.push(b'"');
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" upstream=");
    match entry.upstream {
        Some(addr) => {
            let _ = write!(out, "{addr}");
        }
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" upstream_time=");
    match entry.upstream_time {
        Some(t) => {
            let _ = write!(out, "{:.3}", t.as_secs_f64());
        }
        None => out.push(b'-'),
    }
    let _ = writeln!(out, " duration={:.3}", entry.duration.as_secs_f64());
}

/// Copies client-controlled bytes, escaping as `\xNN` every byte that could end the quoted field
/// or the line (`"`, `\`, controls) and every non-ASCII byte (so the log stays valid ASCII, the
/// way nginx does it). A hostile request cannot forge a second log line.
fn escape_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: String,
    method: Cow<'a, str>,
    target: Cow<'a, str>,
    protocol: &'a str,
    host: Cow<'a, str>,
    status: u16,
    bytes_sent: u64,
    duration_ms: f64,
    upstream: Option<String>,
    upstream_time_ms: Option<f64>,
    route: Option<&'a str>,
}

/// Appends one JSON object (with its `\n`). serde_json escapes quotes and controls, so the line
/// cannot be split; invalid UTF-8 from the client is replaced with U+FFFD.
pub fn format_json(entry: &AccessEntry, out: &mut Vec<u8>) {
    let line = JsonLine {
        time: rfc3339(entry.time),
        client: entry.client.to_string(),
        method: String::from_utf8_lossy(&entry.method),
        target: String::from_utf8_lossy(&entry.target),
        protocol: entry.protocol,
        host: String::from_utf8_lossy(&entry.host),
        status: entry.status,
        bytes_sent: entry.bytes_sent,
        duration_ms: millis(entry.duration),
        upstream: entry.upstream.map(|a| a.to_string()),
        upstream_time_ms: entry.upstream_time.map(millis),
        route: entry.route.as_deref(),
    };
    // Serializing plain strings and numbers into a Vec has no failure path; a non-finite float
    // would be written as null, and durations are always finite.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Milliseconds with microsecond resolution, so that JSON shows `2.5`, not `2.5000000000000004`.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

#[derive(Debug, PartialEq, Eq)]
struct Date {
    year: i64,
    month: u8,
    day: u8,
}

/// UTC date, seconds into the day and milliseconds into the second. Times before 1970 (a clock
/// set badly) are shown as the epoch rather than failing the line.
fn civil_time(time: SystemTime) -> (Date, u64, u32) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    (civil_from_days(days), secs % 86_400, since.subsec_millis())
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a proleptic Gregorian date.
/// <https://howardhinnant.github.io/date_algorithms.html#civil_from_days>
fn civil_from_days(days: i64) -> Date {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both fit in u8 by the ranges above.
    Date {
        year,
        month: month as u8,
        day: day as u8,
    }
}

/// `2026-11-24T13:55:36.123Z`
fn rfc3339(time: SystemTime) -> String {
    let (date, secs_of_day, millis) = civil_time(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        date.year,
        date.month,
        date.day,
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        millis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-24T13:55:36.789Z
    fn sample_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_795_528_536_789)
    }

    fn sample() -> AccessEntry {
        AccessEntry {
            time: sample_time(),
            client: "127.0.0.1:50312".parse().unwrap(),
            method: Bytes::from_static(b"GET"),
            target: Bytes::from_static(b"/api/x?y=1"),
            protocol: "HTTP/1.1",
            host: Bytes::from_static(b"app.example.com"),
            status: 200,
            bytes_sent: 1234,
            duration: Duration::from_micros(3_200),
            upstream: Some("127.0.0.1:9000".parse().unwrap()),
            upstream_time: Some(Duration::from_micros(2_000)),
            route: Some(Arc::from("api")),
        }
    }

    fn text(entry: &AccessEntry) -> String {
        let mut out = Vec::new();
        format_text(entry, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn civil_dates() {
        assert_eq!(
            civil_from_days(0),
            Date {
                year: 1970,
                month: 1,
                day: 1
            }
        );
        assert_eq!(
            civil_from_days(-1),
            Date {
                year: 1969,
                month: 12,
                day: 31
            }
        );
        // 2000-02-29: a leap day in a century year divisible by 400.
        assert_eq!(
            civil_from_days(11_016),
            Date {
                year: 2000,
                month: 2,
                day: 29
            }
        );
        assert_eq!(
            civil_from_days(20_788),
            Date {
                year: 2026,
                month: 12,
                day: 1
            }
        );
        assert_eq!(rfc3339(sample_time()), "2026-11-24T13:55:36.789Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn text_line() {
        assert_eq!(
            text(&sample()),
            "127.0.0.1:50312 - - [24/Nov/2026:13:55:36 +0000] \"GET /api/x?y=1 HTTP/1.1\" 200 1234 \
             host=\"app.example.com\" route=\"api\" upstream=127.0.0.1:9000 upstream_time=0.002 \
             duration=0.003\n"
        );
    }

    #[test]
    fn text_line_without_upstream_route_or_host() {
        let entry = AccessEntry {
            host: Bytes::new(),
            route: None,
            upstream: None,
            upstream_time: None,
            status: 404,
            bytes_sent: 0,
            ..sample()
        };
        assert!(text(&entry)
            .ends_with("\" 404 0 host=- route=- upstream=- upstream_time=- duration=0.003\n"));
    }

    #[test]
    fn text_line_cannot_be_forged() {
        let entry = AccessEntry {
            method: Bytes::from_static(b"G\"ET"),
            target: Bytes::from_static(b"/a\" 200 1\n127.0.0.2 \\x \xff"),
            host: Bytes::from_static(b"h\r\n"),
            ..sample()
        };
        let line = text(&entry);
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.contains(
            "\"G\\x22ET /a\\x22 200 1\\x0a127.0.0.2 \\x5cx \\xff HTTP/1.1\" 200 1234 host=\"h\\x0d\\x0a\""
        ));
    }

    #[test]
    fn json_line() {
        let mut out = Vec::new();
        format_json(&sample(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "time": "2026-11-24T13:55:36.789Z",
                "client": "127.0.0.1:50312",
                "method": "GET",
                "target": "/api/x?y=1",
                "protocol": "HTTP/1.1",
                "host": "app.example.com",
                "status": 200,
                "bytes_sent": 1234,
                "duration_ms": 3.2,
                "upstream": "127.0.0.1:9000",
                "upstream_time_ms": 2.0,
                "route": "api",
            })
        );
    }

    #[test]
    fn json_line_with_nulls_and_bad_utf8() {
        let entry = AccessEntry {
            target: Bytes::from_static(b"/\xff\n"),
            upstream: None,
            upstream_time: None,
            route: None,
            ..sample()
        };
        let mut out = Vec::new();
        format_json(&entry, &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["target"], "/\u{fffd}\n");
        assert!(value["upstream"].is_null());
        assert!(value["upstream_time_ms"].is_null());
        assert!(value["route"].is_null());
    }

    #[test]
    fn off_is_disabled() {
        let settings = LogSettings {
            access: AccessTarget::Off,
            format: LogFormat::Text,
        };
        let log = AccessLog::start(&settings, Arc::default()).unwrap();
        assert!(!log.is_enabled());
        log.log(sample());
    }

    #[test]
    fn writes_lines_to_file_and_flushes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        std::fs::write(&path, "existing\n").unwrap();
        let settings = LogSettings {
            access: AccessTarget::File(path.clone()),
            format: LogFormat::Json,
        };
        let metrics = Arc::new(Metrics::default());
        let log = AccessLog::start(&settings, Arc::clone(&metrics)).unwrap();
        assert!(log.is_enabled());
        let clone = log.clone();
        for _ in 0..3 {
            clone.log(sample());
        }
        drop(clone);
        log.log(sample());
        drop(log);

        let contents = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = contents.lines().collect();
        assert_eq!(lines.len(), 5, "{contents}");
        assert_eq!(lines[0], "existing", "append mode keeps what was there");
        for line in &lines[1..] {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["status"], 200);
        }
        assert_eq!(
            metrics
                .access_log_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn full_queue_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(Metrics::default());
        // A queue of one that nobody reads stands in for a writer that has fallen behind.
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let (_, done) = mpsc::channel();
        let log = AccessLog {
            inner: Some(Arc::new(Inner {
                tx: Some(tx),
                metrics: Arc::clone(&metrics),
                done: Mutex::new(done),
            })),
        };
        for _ in 0..3 {
            log.log(sample());
        }
        assert_eq!(
            metrics
                .access_log_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn unopenable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("access.log");
        let settings = LogSettings {
            access: AccessTarget::File(path),
            format: LogFormat::Text,
        };
        assert!(AccessLog::start(&settings, Arc::default()).is_err());
    }
}
