//! HTTP/2 (RFC 9113) on the client side, with the `h2` crate: the connection and its limits
//! (`server`), the frames h2 does not police itself (`guard`), and the translation between an
//! HTTP/2 stream and the HTTP/1.1 view the rest of the proxy works on (`translate`).
//! `client` holds the multiplexed connections to HTTP/2 upstreams.
//!
//! Neighbours: `conn.rs` starts `server::serve` for a connection that chose `h2` by ALPN or
//! opened with the h2c preface on a listener with `http2 = true`; every stream is then one
//! `proxy::h2::serve_stream` task, which routes, balances, retries, logs and counts it as the
//! HTTP/1.1 spine does, and forwards it to an HTTP/1.1 or an HTTP/2 upstream.

pub mod client;
pub mod guard;
pub mod server;
pub mod translate;

pub use guard::PREFACE;
