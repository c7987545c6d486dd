//! Runnable choreographies built with choreo.
//!
//! - [`shop`]: four services choreographed only by events, with failure paths
//!   and a compensation; `scripts/shop` (or `cargo run --release -p
//!   choreo-examples --example shop`) runs it.
//! - The benchmark, `cargo run --release -p choreo-examples --example bench`,
//!   compares choreo with hand-written async-nats code in one run.

pub mod http;
pub mod shop;
pub mod storefront;

/// What a nats-server the testkit started holds: its resident memory and
/// its store's bytes on disk (for the capacity examples).
pub mod footprint {
    use std::path::Path;

    use choreo_testkit::NatsServer;

    /// The server's resident memory in bytes.
    pub fn rss(server: &NatsServer) -> u64 {
        let Some(pid) = server.pid() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Bytes of the files below `dir`.
    pub fn disk(dir: &Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        disk(&path)
                    } else {
                        e.metadata().map_or(0, |m| m.len())
                    }
                })
                .sum()
        })
    }
}
