//! Watches the frames an HTTP/2 client sends, for the floods that h2 itself does not bound.
//!
//! Neighbours: `http2::server` wraps every client connection's byte stream in `Guarded` before
//! h2 sees it, and closes the connection with GOAWAY (ENHANCE_YOUR_CALM) when the tripwire here
//! fires. What h2 0.4.20 bounds on its own, and so is not counted here: CONTINUATION floods and
//! oversized header blocks (`max_header_list_size`), empty and tiny DATA frames (its small-frame
//! budget and a cap of 100 empty frames), reset streams waiting to be accepted (Rapid Reset's
//! first form), and the resets a client makes us send (MadeYouReset). What it does not bound,
//! and this does:
//!
//! - **Rapid Reset** (CVE-2023-44487) against streams already accepted: RST_STREAM frames are
//!   counted against the streams the client opened. As Envoy does, a connection is closed when
//!   its resets pass `max_client_resets` and are also more than half of its streams: a browser
//!   that cancels now and then never gets there, a client that resets everything does at once.
//! - **PING, SETTINGS and PRIORITY floods** (CVE-2019-9512, -9515, -9516 family): h2 answers
//!   each PING and SETTINGS, one at a time, and reads no further until the answer is written,
//!   so memory is bounded, but CPU is not. More than `max_control_frames` of them in a
//!   10-second window closes the connection.
//!
//! Only frame headers are parsed (9 bytes each, RFC 9113 §4.1); payloads are skipped, never
//! copied, so this costs a few comparisons per frame.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::metrics::Abuse;

/// The client connection preface (RFC 9113 §3.4): 24 bytes before the first frame.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The window over which control frames are counted.
const CONTROL_WINDOW: Duration = Duration::from_secs(10);

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const ACK: u8 = 0x1;

/// What one connection is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_client_resets: u64,
    pub max_control_frames: u32,
}

/// Set once, when the client crossed a limit; the connection's driver waits on it.
#[derive(Debug, Default)]
pub struct Tripwire {
    /// 0 while untouched; else 1 + the `Abuse` index.
    tripped: AtomicU8,
    notify: Notify,
}

impl Tripwire {
    fn trip(&self, why: Abuse) {
        let code = why as u8 + 1;
        if self
            .tripped
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    /// Marks the connection as abusive from outside the frame stream (a stalled reader).
    pub fn trip_external(&self, why: Abuse) {
        self.trip(why);
    }

    /// Resolves when a limit was crossed, with the reason.
    pub async fn tripped(&self) -> Abuse {
        loop {
            if let Some(why) = self.reason() {
                return why;
            }
            self.notify.notified().await;
        }
    }

    pub fn reason(&self) -> Option<Abuse> {
        match self.tripped.load(Ordering::Acquire) {
            0 => None,
            n => Abuse::ALL.get(usize::from(n - 1)).copied(),
        }
    }
}

/// Frame-header parser state and the counters it keeps.
#[derive(Debug)]
struct Counter {
    limits: Limits,
    preface_left: usize,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    highest_stream: u32,
    streams: u64,
    resets: u64,
    window_start: Instant,
    control_in_window: u32,
    /// Counted, not acted on: h2 limits them, and a test may want to see them.
    empty_data: u64,
}

impl Counter {
    fn new(limits: Limits) -> Counter {
        Counter {
            limits,
            preface_left: PREFACE.len(),
            header: [0; 9],
            have: 0,
            skip: 0,
            highest_stream: 0,
            streams: 0,
            resets: 0,
            window_start: Instant::now(),
            control_in_window: 0,
            empty_data: 0,
        }
    }

    /// Reads frame headers out of `data`; the first limit crossed, if any.
    fn feed(&mut self, mut data: &[u8]) -> Option<Abuse> {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                data = &data[n..];
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.header;
                let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.skip = len;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                if let Some(why) = self.frame(h[3], h[4], stream, len) {
                    return Some(why);
                }
            }
        }
        None
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, len: usize) -> Option<Abuse> {
        match kind {
            HEADERS if stream > self.highest_stream => {
                self.highest_stream = stream;
                self.streams += 1;
            }
            RST_STREAM => {
                self.resets += 1;
                if self.resets > self.limits.max_client_resets
                    && self.resets.saturating_mul(2) > self.streams
                {
                    return Some(Abuse::Resets);
                }
            }
            DATA if len == 0 => self.empty_data += 1,
            PING | PRIORITY => return self.control(),
            SETTINGS if flags & ACK == 0 => return self.control(),
            _ => {}
        }
        None
    }

    fn control(&mut self) -> Option<Abuse> {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= CONTROL_WINDOW {
            self.window_start = now;
            self.control_in_window = 0;
        }
        self.control_in_window += 1;
        (self.control_in_window > self.limits.max_control_frames).then_some(Abuse::ControlFrames)
    }
}

/// A client's byte stream with the frame counter on its read side. `prefix` holds bytes read
/// before HTTP/2 was recognised (the h2c preface); they are served first.
pub struct Guarded<T> {
    io: T,
    prefix: Bytes,
    counter: Counter,
    tripwire: Arc<Tripwire>,
}

impl<T> Guarded<T> {
    pub fn new(io: T, prefix: Bytes, limits: Limits) -> (Guarded<T>, Arc<Tripwire>) {
        let tripwire = Arc::new(Tripwire::default());
        let guarded = Guarded {
            io,
            prefix,
            counter: Counter::new(limits),
            tripwire: Arc::clone(&tripwire),
        };
        (guarded, tripwire)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tripwire.reason().is_some() {
            // Nothing more is read from a client that crossed a limit: the driver is sending
            // GOAWAY and will drop the connection; it is woken by the tripwire, not by us.
            return Poll::Pending;
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let chunk = this.prefix.split_to(n);
            buf.put_slice(&chunk);
            if let Some(why) = this.counter.feed(&chunk) {
                this.tripwire.trip(why);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if let Some(why) = this.counter.feed(&buf.filled()[before..]) {
                this.tripwire.trip(why);
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        f.resize(9 + payload, 0);
        f
    }

    fn counter(resets: u64, control: u32) -> Counter {
        Counter::new(Limits {
            max_client_resets: resets,
            max_control_frames: control,
        })
    }

    #[test]
    fn pings_past_the_limit_trip() {
        let mut c = counter(100, 3);
        let mut bytes = PREFACE.to_vec();
        for _ in 0..3 {
            bytes.extend(frame(PING, 0, 0, 8));
        }
        assert_eq!(c.feed(&bytes), None);
        assert_eq!(c.feed(&frame(PING, 0, 0, 8)), Some(Abuse::ControlFrames));
    }

    #[test]
    fn frames_split_anywhere_are_counted_once() {
        let mut c = counter(100, 1000);
        let mut bytes = PREFACE.to_vec();
        for id in (1..40).step_by(2) {
            bytes.extend(frame(HEADERS, 0x4, id, 17));
            bytes.extend(frame(SETTINGS, ACK, 0, 0));
        }
        for piece in bytes.chunks(5) {
            assert_eq!(c.feed(piece), None);
        }
        assert_eq!(c.streams, 20);
        assert_eq!(c.control_in_window, 0, "SETTINGS acks are not counted");
    }

    #[test]
    fn resets_trip_only_when_most_streams_are_reset() {
        let mut c = counter(4, 1000);
        c.feed(PREFACE);
        // Many streams, a few resets: a browser cancelling now and then.
        for id in (1..41).step_by(2) {
            assert_eq!(c.feed(&frame(HEADERS, 0x5, id, 3)), None);
        }
        for id in (1..11).step_by(2) {
            assert_eq!(c.feed(&frame(RST_STREAM, 0, id, 4)), None);
        }
        // Then every new stream reset at once.
        let mut tripped = None;
        for id in (41..200).step_by(2) {
            c.feed(&frame(HEADERS, 0x5, id, 3));
            tripped = tripped.or(c.feed(&frame(RST_STREAM, 0, id, 4)));
        }
        assert_eq!(tripped, Some(Abuse::Resets));
    }
}
