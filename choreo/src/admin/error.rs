//! [`AdminError`]: what `choreo::admin` could not read, and why.

use async_nats::jetstream;

use crate::nats::{Cause, Source, recent_permission_error};

/// What went wrong reading a choreography.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminErrorKind {
    /// The registry's bucket does not exist: no choreo service has started
    /// on this server (or in this JetStream domain).
    NoRegistry,
    /// The server denied a request: the user lacks a permission
    /// ([`Permissions::observer`](crate::Permissions::observer) lists them).
    Denied,
    /// No JetStream answered: it is off, or absent in this domain.
    NoJetStream,
    /// The request itself cannot be carried out (an unknown handler, a
    /// time in the future, a sequence past the end); nothing was changed.
    BadRequest,
    /// Anything else (a timeout, a lost connection).
    Other,
}

/// What `choreo::admin` could not read: one line that says what, why, and
/// what to do. `source()` is the async-nats error.
#[derive(Clone, thiserror::Error)]
#[error("{}", self.line())]
pub struct AdminError {
    kind: AdminErrorKind,
    what: String,
    denied: Option<String>,
    #[source]
    source: Source,
}
crate::debug_as_display!(AdminError);

impl AdminError {
    /// Reads `source`'s cause, and any permission violation the server
    /// reported on `js`'s connection, for reading `what`.
    pub(crate) fn new(js: &jetstream::Context, what: impl Into<String>, source: Source) -> Self {
        let denied = recent_permission_error(&js.client());
        let cause = Cause::of(&*source);
        let kind = if denied.is_some() {
            AdminErrorKind::Denied
        } else if cause == Cause::Code(jetstream::ErrorCode::STREAM_NOT_FOUND) {
            AdminErrorKind::NoRegistry
        } else if cause.jetstream_off() {
            AdminErrorKind::NoJetStream
        } else {
            AdminErrorKind::Other
        };
        Self {
            kind,
            what: what.into(),
            denied,
            source,
        }
    }

    /// The server denied the request for reading `what` with `violation`.
    pub(crate) fn denied(what: impl Into<String>, violation: String) -> Self {
        Self {
            kind: AdminErrorKind::Denied,
            what: what.into(),
            source: crate::nats::message(violation.clone()),
            denied: Some(violation),
        }
    }

    /// A request that cannot be carried out, and why.
    pub(crate) fn bad_request(what: impl Into<String>, why: String) -> Self {
        Self {
            kind: AdminErrorKind::BadRequest,
            what: what.into(),
            source: crate::nats::message(why),
            denied: None,
        }
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> AdminErrorKind {
        self.kind
    }

    fn line(&self) -> String {
        if self.kind == AdminErrorKind::BadRequest {
            format!("cannot do {}: {}", self.what, self.source)
        } else {
            format!("cannot read {}: {}", self.what, self.explain())
        }
    }

    fn explain(&self) -> String {
        match (self.kind, &self.denied) {
            (AdminErrorKind::Denied, Some(d)) => format!(
                "the server denied it ({d}); give this user the permissions of choreo::Permissions::observer (docs/deployment.md)"
            ),
            (AdminErrorKind::NoRegistry, _) => format!(
                "{}; no choreo service has started on this server (or in this JetStream domain: --domain)",
                self.source
            ),
            (AdminErrorKind::NoJetStream, _) => format!(
                "{}; JetStream is not enabled on this server (or in this domain: --domain)",
                self.source
            ),
            _ => self.source.to_string(),
        }
    }
}
