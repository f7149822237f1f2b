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
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read file: {e}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let snapshot = match config::load_str(path, &text, &metrics) {
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
        let gatehouse =
            Gatehouse::start_from(Some(path.to_owned()), text.into(), snapshot, metrics).await?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "gatehouse started");
        let mut signals = Signals::install();
        let drained = {
            let stop = gatehouse.shared().drain.clone();
            async move { stop.cancelled().await }
        };
        tokio::pin!(drained);
        loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Reload => {
                        tracing::info!("SIGHUP: reloading {}", path.display());
                        // The outcome is logged (and counted) by the reload itself.
                        let _ = gatehouse.reload().await;
                    }
                    Signal::Stop(name) => {
                        tracing::info!("{name}: draining");
                        gatehouse.shutdown();
                        break;
                    }
                },
                _ = &mut drained => break,
            }
        }
        gatehouse.wait().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

enum Signal {
    /// SIGHUP.
    Reload,
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
}

/// The signals `run` acts on. Without handlers (a sandbox that forbids them) we still serve; we
/// just cannot drain or reload on a signal.
struct Signals {
    handlers: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = match (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(hup), Ok(term), Ok(int)) => Some([hup, term, int]),
            _ => None,
        };
        Signals { handlers }
    }

    async fn next(&mut self) -> Signal {
        let Some([hup, term, int]) = &mut self.handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = hup.recv() => Signal::Reload,
            _ = term.recv() => Signal::Stop("SIGTERM"),
            _ = int.recv() => Signal::Stop("SIGINT"),
        }
    }
}
