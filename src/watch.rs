//! Reloading when the config file changes (`[reload] watch = true`), for deployments that
//! write the file and send no signal (a config-management run, a Kubernetes ConfigMap).
//!
//! Neighbours: `app.rs` starts `run` once; it calls `Reloader::reload` exactly as SIGHUP does,
//! so a broken file is refused, logged and counted the same way.
//!
//! The file is polled: one `stat` per interval, and a read only when its size, time or inode
//! changed. Polling rather than inotify because it also sees a file replaced by rename (how
//! editors, `kubectl` and atomic deploys write), a symlink swapped (a ConfigMap's `..data`), and
//! works on every file system. A change is acted on only once the file has stayed the same for
//! one more look, so a file caught half-written is not reloaded (and refused) first. Contents
//! that failed to load are not tried again until they change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::reload::Reloader;

/// How long to wait between the two looks that must agree before a reload.
const SETTLE: Duration = Duration::from_millis(100);
/// How often to look at the config when watching is off, for a reload that turns it on.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// What `stat` says of the file: a change in any of these means its contents may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    // Follows symlinks: a swapped link target is a change.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        inode: meta.ino(),
    })
}

/// Watches `path` until `stop`, reloading when its contents change and differ from the config
/// in force.
pub async fn run(
    path: PathBuf,
    reloader: Arc<Reloader>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut last = stamp(&path);
    // Contents that failed to load, so that a broken file is reported once, not every interval.
    let mut refused: Option<Arc<str>> = None;
    loop {
        let every = shared.config.load().watch;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every.unwrap_or(IDLE_LOOK)) => {}
        }
        if every.is_none() {
            // Not watching: not even a stat. When a reload turns watching on, the file may look
            // changed to the first look; its text is the config in force, so nothing reloads.
            continue;
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        // Changed: wait until it holds still.
        tokio::time::sleep(SETTLE).await;
        let settled = stamp(&path);
        if settled != now {
            continue;
        }
        last = settled;
        // A small file, read once per change: not worth a blocking-pool hop.
        let Ok(text) = std::fs::read_to_string(&path) else {
            // Gone or unreadable for now (mid-replacement): look again next time.
            last = None;
            continue;
        };
        if *reloader.status().text == *text || refused.as_deref() == Some(text.as_str()) {
            continue;
        }
        tracing::info!("{} changed: reloading", path.display());
        match reloader.reload().await {
            Ok(_) => refused = None,
            Err(_) => refused = Some(text.into()),
        }
    }
}
