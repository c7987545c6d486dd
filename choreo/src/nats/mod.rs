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
