//! The command line: `run`, `check`, `--version`.
//!
//! Neighbours: `main.rs` parses with clap and calls `run` or `check`; `run` builds the tokio
//! runtime with the configured number of workers and hands over to `app`. With
//! `--upgrade-socket` it also serves binary upgrades (`handoff.rs`); with `--takeover` it is the
//! new binary of such an upgrade.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::{Gatehouse, Inherited};
use crate::config;
use crate::handoff;
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
    Run(RunArgs),
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

/// `gatehouse run`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Serve binary upgrades on this Unix socket: a new gatehouse started with --takeover and
    /// the same path takes the listening sockets over (and so does SIGUSR2). Off when not given.
    #[arg(long, value_name = "PATH")]
    pub upgrade_socket: Option<PathBuf>,
    /// Take the listening sockets over from the gatehouse serving upgrades on --upgrade-socket;
    /// that process then stops accepting, finishes its requests and exits.
    #[arg(long, requires = "upgrade_socket")]
    pub takeover: bool,
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

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let path = &args.config.path();
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
    runtime.block_on(serve(path, text, snapshot, metrics, args))
}

/// Starts (afresh, or taking over from the process on the upgrade socket), then serves until a
/// signal, `POST /drain` or a takeover ends it.
async fn serve(
    path: &Path,
    text: String,
    snapshot: config::snapshot::Snapshot,
    metrics: Arc<Metrics>,
    args: &RunArgs,
) -> anyhow::Result<ExitCode> {
    // Installed first: a SIGTERM while a takeover is under way must drain this process like any
    // other, not kill it between "taken" and serving (the old one would be gone too).
    let mut signals = Signals::install();
    // The upgrade socket is bound (or the old process's sockets received) before anything
    // listens, so that a failure there leaves nothing half started.
    let mut takeover = None;
    let mut upgrade = None;
    match (&args.upgrade_socket, args.takeover) {
        (Some(socket), true) => match handoff::take_over(socket).await {
            Ok(t) => takeover = Some(t),
            Err(e) => {
                eprintln!("gatehouse: {e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        (Some(socket), false) => match handoff::bind(socket) {
            Ok(listener) => upgrade = Some(listener),
            Err(e) => {
                eprintln!("gatehouse: {e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        (None, _) => {}
    }
    let inherited = takeover
        .as_mut()
        .map(handoff::Takeover::take_sockets)
        .unwrap_or_else(Inherited::default);
    let started = Gatehouse::start_from(
        Some(path.to_owned()),
        text.into(),
        snapshot,
        metrics,
        inherited,
    )
    .await;
    let gatehouse = match started {
        Ok(g) => g,
        Err(e) => {
            match takeover {
                // The old process carries on as if nothing happened.
                Some(t) => t.abort(&e.to_string()).await,
                None => {
                    if let (Some(_), Some(socket)) = (upgrade.take(), &args.upgrade_socket) {
                        let _ = std::fs::remove_file(socket);
                    }
                }
            }
            return Err(e.into());
        }
    };
    if let Some(t) = takeover {
        match t.confirm().await {
            Ok(Ok(listener)) => upgrade = Some(listener),
            Ok(Err(e)) => tracing::warn!("{e}; binary upgrades are off in this process"),
            Err(e) => {
                // Its accept loops stop; the sockets stay open in the old process, so what
                // waits in their queues is accepted there.
                tracing::error!("{e}: this process drains and exits; the old one keeps serving");
                gatehouse.shutdown();
                gatehouse.wait().await;
                return Ok(ExitCode::FAILURE);
            }
        }
    } else {
        // systemd (Type=notify): listening. After a takeover, the old process says MAINPID.
        handoff::notify("READY=1");
    }
    let serving_upgrades = upgrade.is_some();
    if let Some(listener) = upgrade {
        tokio::spawn(handoff::serve(listener, gatehouse.handover()));
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "gatehouse started");
    let drained = {
        let stop = gatehouse.shared().drain.clone();
        async move { stop.cancelled().await }
    };
    tokio::pin!(drained);
    let handed_off = gatehouse.handed_off();
    let upgrading = Arc::new(AtomicBool::new(false));
    let taken_over = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Reload => {
                    tracing::info!("SIGHUP: reloading {}", path.display());
                    // The outcome is logged (and counted) by the reload itself.
                    let _ = gatehouse.reload().await;
                }
                Signal::Upgrade => match (&args.upgrade_socket, serving_upgrades) {
                    (Some(socket), true) => start_successor(path, socket, &upgrading),
                    _ => tracing::warn!(
                        "SIGUSR2: this process serves no upgrade socket (--upgrade-socket); ignored"
                    ),
                },
                Signal::Stop(name) => {
                    tracing::info!("{name}: draining");
                    gatehouse.shutdown();
                    break false;
                }
            },
            _ = handed_off.cancelled() => break true,
            _ = &mut drained => break false,
        }
    };
    if taken_over {
        // SIGTERM meanwhile (systemd stopping the service): close the idle connections now.
        let shared = Arc::clone(gatehouse.shared());
        let finish = gatehouse.finish_handoff();
        tokio::pin!(finish);
        loop {
            tokio::select! {
                _ = &mut finish => break,
                signal = signals.next() => if let Signal::Stop(name) = signal {
                    tracing::info!("{name}: closing the idle connections now");
                    shared.close_idle_now();
                },
            }
        }
    } else {
        gatehouse.wait().await;
        // The path is this process's unless it handed it over (a takeover that completed while
        // this process drained); a later start finds it gone.
        if let (true, false, Some(socket)) = (
            serving_upgrades,
            handed_off.is_cancelled(),
            &args.upgrade_socket,
        ) {
            let _ = std::fs::remove_file(socket);
        }
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGUSR2: starts the binary this process was started as (`argv[0]`: after a package upgrade,
/// the new one) with the same config and `--takeover`, as a child of this process. Under systemd
/// the child so runs in the service's cgroup and logs to its journal, and becomes the service's
/// main process when it has taken over (`MAINPID=`). If it fails (a bad config), it exits 1 with
/// its errors in the log, and this process keeps serving.
fn start_successor(config: &Path, socket: &Path, upgrading: &Arc<AtomicBool>) {
    if upgrading.swap(true, Ordering::SeqCst) {
        tracing::warn!("SIGUSR2: an upgrade is already under way; ignored");
        return;
    }
    let program = std::env::args_os()
        .next()
        .unwrap_or_else(|| "gatehouse".into());
    let spawned = std::process::Command::new(&program)
        .arg("run")
        .arg("-c")
        .arg(config)
        .arg("--upgrade-socket")
        .arg(socket)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        .spawn();
    let shown = program.to_string_lossy().into_owned();
    match spawned {
        Ok(mut child) => {
            let pid = child.id();
            tracing::info!("SIGUSR2: started {shown} (pid {pid}) to take over");
            let upgrading = Arc::clone(upgrading);
            // Reaps the child if it fails; if it takes over, this process exits first.
            std::thread::spawn(move || {
                match child.wait() {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::warn!(
                        "the new process (pid {pid}) ended ({status}); this process keeps \
                         serving unless it had taken over"
                    ),
                    Err(e) => tracing::warn!("waiting for the new process (pid {pid}): {e}"),
                }
                upgrading.store(false, Ordering::SeqCst);
            });
        }
        Err(e) => {
            tracing::error!("SIGUSR2: cannot start {shown}: {e}");
            upgrading.store(false, Ordering::SeqCst);
        }
    }
}

enum Signal {
    /// SIGHUP.
    Reload,
    /// SIGUSR2: start the new binary to take over.
    Upgrade,
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
}

/// The signals `run` acts on. Without handlers (a sandbox that forbids them) we still serve; we
/// just cannot drain or reload on a signal.
struct Signals {
    handlers: Option<[tokio::signal::unix::Signal; 4]>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = match (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(hup), Ok(term), Ok(int), Ok(usr2)) => Some([hup, term, int, usr2]),
            _ => None,
        };
        Signals { handlers }
    }

    async fn next(&mut self) -> Signal {
        let Some([hup, term, int, usr2]) = &mut self.handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = hup.recv() => Signal::Reload,
            _ = term.recv() => Signal::Stop("SIGTERM"),
            _ = int.recv() => Signal::Stop("SIGINT"),
            _ = usr2.recv() => Signal::Upgrade,
        }
    }
}
