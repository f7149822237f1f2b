//! Picks a server of an upstream for each request.
//!
//! Neighbours: `proxy.rs` asks the upstream's balancer for a server index, then `upstream/pool.rs`
//! for a connection to it. One file per algorithm; issue-level algorithms (P2C, hashing) join here.

mod smooth_weighted;

pub use smooth_weighted::SmoothWeighted;
