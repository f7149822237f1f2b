//! The `gatehouse` binary: parse the command line, start logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use gatehouse::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GATEHOUSE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Check(config) => cli::check(&config.path()),
        Command::Run(args) => match cli::run(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("gatehouse: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
