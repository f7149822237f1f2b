//! After a 101 (Switching Protocols): the client and the upstream talk their new protocol
//! (WebSocket, most often) through us, bytes copied both ways until either side is done.
//!
//! Neighbours: `proxy::forward` hands over both connections once the 101 is read; nothing of
//! HTTP applies any more, so this is all that is left of the exchange. The tunnel has its own
//! idle limit (`tunnel_idle`): a WebSocket may rightly stay quiet far longer than an HTTP
//! response may pause, but a tunnel nobody uses must not hold its two sockets forever.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::upstream::state::now_ms;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Copies both ways until both sides have closed their sending half, one side fails, or
/// nothing moved for `idle`. `early_up` and `early_down` are bytes already read past the
/// heads (the client may send its first frames right behind the request; the upstream right
/// behind the 101): they go first.
pub async fn run<C: AsyncRead + AsyncWrite + Unpin, U: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut U,
    early_up: &[u8],
    early_down: &[u8],
    idle: Duration,
) -> Moved {
    let last = AtomicU64::new(now_ms());
    let mut moved = Moved::default();
    if !early_up.is_empty() && upstream.write_all(early_up).await.is_err() {
        return moved;
    }
    if !early_down.is_empty() && client.write_all(early_down).await.is_err() {
        return moved;
    }
    moved.to_upstream = early_up.len() as u64;
    moved.to_client = early_down.len() as u64;
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let both = async {
        tokio::join!(
            copy(&mut client_read, &mut up_write, &last),
            copy(&mut up_read, &mut client_write, &last),
        )
    };
    tokio::select! {
        (up, down) = both => {
            moved.to_upstream += up;
            moved.to_client += down;
        }
        () = idle_for(&last, idle) => {
            tracing::debug!("tunnel idle for {idle:?}: closed");
        }
    }
    moved
}

/// Resolves once nothing has moved for `idle`: `last` is when something last did (`now_ms`).
/// One timer at a time, re-armed for the remaining quiet time rather than on every transfer.
pub(super) async fn idle_for(last: &AtomicU64, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let quiet = now_ms().saturating_sub(last.load(Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
    }
}

/// One direction: reads until end of stream (then closes the other side's sending half, so a
/// close travels through) or an error; every transfer counts as activity.
async fn copy<R, W>(from: &mut R, to: &mut W, last: &AtomicU64) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return total;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return total;
                }
                total += n as u64;
                last.store(now_ms(), Relaxed);
            }
        }
    }
}
