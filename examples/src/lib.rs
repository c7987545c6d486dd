//! Runnable choreographies built with choreo.
//!
//! - [`shop`]: four services choreographed only by events, with failure paths
//!   and a compensation; `scripts/shop` (or `cargo run --release -p
//!   choreo-examples --example shop`) runs it.
//! - The benchmark, `cargo run --release -p choreo-examples --example bench`,
//!   compares choreo with hand-written async-nats code in one run.

pub mod shop;

/// The number after `name` in `args`, or `default` (for the examples'
/// `--events N`-style flags).
pub fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
