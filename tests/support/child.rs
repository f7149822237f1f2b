//! A `gatehouse` (or any) child process for the tests that run the binary: signalled with
//! `/bin/kill`, waited for with a bound, and killed on drop if a test fails before it exits.

use std::process::Child;
use std::time::Duration;

use super::poll_until;

pub struct Running(pub Child);

impl Running {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// `kill -NAME pid`.
    pub fn signal(&self, name: &str) {
        signal(name, self.pid());
    }

    /// Waits up to `limit` for the process to exit by itself; its exit code.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let exited = poll_until(limit, || {
            let status = self.0.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        exited.and_then(|s| s.code())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `kill -NAME pid`, for a process that may not be our child.
pub fn signal(name: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{name} {pid}");
}
