//! Gatehouse's integration tests, built as one binary (`cargo test --test main`).
//!
//! Every test talks to 127.0.0.1 over real sockets: `support` starts Gatehouse in-process on port
//! 0 (or runs the binary), real upstream servers (hyper, or raw TCP that misbehaves on purpose) and
//! real clients (reqwest, or raw bytes for what a well-behaved client would never send).
//!
//! The test modules live in `tests/suite/` rather than directly in `tests/`: Cargo builds every
//! `tests/*.rs` file as a binary of its own, and these modules only make sense inside this one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic on setup failures: that is a failed test, as intended"
)]

mod support;

#[path = "suite/admin.rs"]
mod admin;
#[path = "suite/balancing.rs"]
mod balancing;
#[path = "suite/cli.rs"]
mod cli;
#[path = "suite/dns.rs"]
mod dns;
#[path = "suite/errors.rs"]
mod errors;
#[path = "suite/grpc.rs"]
mod grpc;
#[path = "suite/health.rs"]
mod health;
#[path = "suite/http2.rs"]
mod http2;
#[path = "suite/http2_attacks.rs"]
mod http2_attacks;
#[path = "suite/http2_upstream.rs"]
mod http2_upstream;
#[path = "suite/operations.rs"]
mod operations;
#[path = "suite/pooling.rs"]
mod pooling;
#[path = "suite/reload.rs"]
mod reload;
#[path = "suite/resilience.rs"]
mod resilience;
#[path = "suite/routing.rs"]
mod routing;
#[path = "suite/shutdown.rs"]
mod shutdown;
#[path = "suite/smuggling.rs"]
mod smuggling;
#[path = "suite/streaming.rs"]
mod streaming;
#[path = "suite/tls.rs"]
mod tls;
#[path = "suite/upgrade.rs"]
mod upgrade;
#[path = "suite/upstream_tls.rs"]
mod upstream_tls;
#[path = "suite/websocket.rs"]
mod websocket;
