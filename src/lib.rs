//! Gatehouse: a memory-safe edge reverse proxy and load balancer.
//!
//! The path of one request through the modules:
//!
//! ```text
//!  client ──TCP──► listener ──► conn ──(head parsed by http1::request)──► proxy  (the spine)
//!                  accept,      keep-alive,                              │ router: (host, path) -> route
//!                  conn cap     timeouts, drain                          │ respond route ─► fixed response
//!                                                                        │ upstream::select + balance: pick a server
//!                                                                        │   (health, ejection, caps, tiers)
//!                                                                        │ upstream::pool: idle conn or connect
//!                                                                        │ http1::write: request head, body
//!                                                                        │ http1::response: response head
//!                                                                        ▼
//!  client ◄───────────── response head + body streamed back ◄────────── upstream server
//!                         access_log (off the request path), metrics
//! ```
//!
//! An HTTP/2 connection (`h2` by ALPN, or h2c with prior knowledge) goes from `conn` to
//! `http2::server` instead, and each of its streams through `proxy::h2`, the same phases again.
//!
//! `config` turns the TOML file into an immutable `Snapshot` that `app` publishes through an
//! `ArcSwap`; a request loads it once. `admin` serves `/health`, `/metrics` and `/upstreams`
//! with axum. Beside the request path, `upstream::health` checks servers and
//! `upstream::resolve` keeps names resolved; `upstream::state` holds what they and the request
//! path learn about each server.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod handoff;
pub mod http1;
pub mod http2;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod watch;
