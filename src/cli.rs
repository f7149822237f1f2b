//! The command line: `run`, `check`, `--version`.
//!
//! Neighbours: `main.rs` parses with clap and calls `run` or `check`; `run` builds the tokio
//! runtime with the configured number of workers and hands over to `app`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::Gatehouse;
use crate::config;
use crate::metrics::Metrics;

#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "A memory-safe edge reverse proxy and load balancer"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run in the foreground, logging to stderr, until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Validate the config file: exit 0, or print every problem as FILE:LINE:COL: message.
    Check(ConfigArg),
}

/// The config file, as `-c FILE` or a plain argument; `./gatehouse.toml` when neither is given.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The config file [default: gatehouse.toml]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(value_name = "FILE", conflicts_with = "config", hide = true)]
    file: Option<PathBuf>,
}

impl ConfigArg {
    pub fn path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| self.file.clone())
            .unwrap_or_else(|| PathBuf::from("gatehouse.toml"))
    }
}

pub fn check(path: &Path) -> ExitCode {
    match config::load(path, &Metrics::default()) {
        Ok(_) => {
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            if !e.to_string().ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
    }
}

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let metrics = Arc::new(Metrics::default());
    let snapshot = match config::load(path, &metrics) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // One worker: a current-thread runtime, with no work-stealing machinery to pay for and no
    // hand-off between a driver thread and a worker. More: a multi-thread runtime, so that one
    // pool of upstream connections serves every thread (connections stay warm whichever thread
    // a client lands on).
    let mut builder = match snapshot.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder
        .enable_all()
        .thread_name("gatehouse-worker")
        .build()?;
    runtime.block_on(async move {
        let gatehouse = Gatehouse::start_with(snapshot, metrics).await?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "gatehouse started");
        let signals = shutdown_signal();
        tokio::pin!(signals);
        let drained = {
            let stop = gatehouse.shared().drain.clone();
            async move { stop.cancelled().await }
        };
        tokio::select! {
            signal = &mut signals => {
                tracing::info!("{signal}: draining");
                gatehouse.shutdown();
            }
            _ = drained => {}
        }
        gatehouse.wait().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves with the signal's name on SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can still serve; we just cannot drain on a signal.
        std::future::pending::<()>().await;
        return "never";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
