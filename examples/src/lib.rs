//! Runnable choreographies built with choreo.
//!
//! - [`shop`]: four services choreographed only by events, with failure paths
//!   and a compensation; `scripts/shop` (or `cargo run --release -p
//!   choreo-examples --example shop`) runs it.
//! - The benchmark, `cargo run --release -p choreo-examples --example bench`,
//!   compares choreo with hand-written async-nats code in one run.

pub mod shop;
