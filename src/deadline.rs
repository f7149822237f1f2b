//! Time limits on I/O that cost a timer only when the I/O has to wait.
//!
//! Most reads and writes on the request path complete on their first poll (the bytes are
//! already there, or the socket buffer has room). Arming a tokio timer for each costs a
//! thread-local lookup, a clock read and a timer-wheel insert and removal; `limit` polls the
//! operation once first and arms the timer only if it is still pending.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// The operation did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `op` for at most `limit` (measured from its first wait, a negligible difference).
pub async fn limit<F: Future>(limit: Duration, op: F) -> Result<F::Output, Elapsed> {
    let mut op = pin!(op);
    if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await {
        return Ok(out);
    }
    tokio::time::timeout(limit, op).await.map_err(|_| Elapsed)
}

/// Runs `op` until `deadline`.
pub async fn until<F: Future>(deadline: tokio::time::Instant, op: F) -> Result<F::Output, Elapsed> {
    let mut op = pin!(op);
    if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(op.as_mut().poll(cx))).await {
        return Ok(out);
    }
    tokio::time::timeout_at(deadline, op)
        .await
        .map_err(|_| Elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_operations_need_no_timer() {
        assert_eq!(limit(Duration::ZERO, async { 7 }).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn pending_operations_time_out() {
        let never = std::future::pending::<()>();
        assert_eq!(limit(Duration::from_secs(1), never).await, Err(Elapsed));
    }

    #[tokio::test(start_paused = true)]
    async fn pending_operations_can_finish_in_time() {
        let later = tokio::time::sleep(Duration::from_millis(10));
        assert_eq!(limit(Duration::from_secs(1), later).await, Ok(()));
    }
}
