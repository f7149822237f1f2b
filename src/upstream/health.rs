//! Active health checks. STUB: a helper writes this module.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::snapshot::Upstream;

/// Checks every server of `upstream` each interval until `stop`.
pub async fn run(upstream: Arc<Upstream>, stop: CancellationToken) {
    let _ = upstream;
    stop.cancelled().await;
}
