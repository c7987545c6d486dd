//! Talking to NATS: [`connect()`] (a connection whose failures say what to
//! do), [`ConnectError`], the permission violations a server reports on a
//! connection, and reading async-nats errors by their kinds.

mod api;
mod connect;
pub(crate) mod error;
pub(crate) mod permissions;

pub use api::JetStreamApi;
pub use connect::connect;
pub(crate) use error::{Cause, message, source};
pub use error::{ConnectError, ConnectErrorKind, Source};
pub(crate) use permissions::{or_denied, recent_permission_error};

/// Whether `version` (`2.12.0`, `v2.15.1-beta`) is at least `(major, minor)`.
pub(crate) fn version_at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}
