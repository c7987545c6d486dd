//! Talking to NATS: [`connect()`] (a connection whose failures say what to
//! do), [`ConnectError`], the permission violations a server reports on a
//! connection, reading async-nats errors by their kinds, and the one
//! subscription that answers of batched reads arrive on ([`Answers`]).

mod answers;
mod api;
mod connect;
pub(crate) mod error;
pub(crate) mod permissions;

pub(crate) use answers::{Answers, LazyAnswers};
pub use api::JetStreamApi;
pub use connect::connect;
pub(crate) use error::{Cause, message, moved_on, moved_on_code, source};
pub use error::{ConnectError, ConnectErrorKind, Source};
pub(crate) use permissions::{or_denied, recent_permission_error};

/// `d` scaled by a factor between 0.5 and 1.5: the pause of writers that
/// conflicted, so they do not come back in step.
pub(crate) fn jitter(d: std::time::Duration) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let r = (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + r)
}

/// Whether `version` (`2.12.0`, `v2.15.1-beta`) is at least `(major, minor)`.
pub(crate) fn version_at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}
