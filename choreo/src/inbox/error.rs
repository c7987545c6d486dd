//! What goes wrong with the inbox, and how a caller tells the kinds apart.

use crate::nats::{Cause, Source, recent_permission_error};

/// The inbox could not be read or written.
///
/// `{:?}` prints the message; `{:#?}` the fields.
#[derive(Clone, thiserror::Error)]
#[error("inbox {bucket}: {what}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct InboxError {
    bucket: String,
    what: String,
    #[source]
    source: Option<Source>,
    kind: InboxErrorKind,
}

/// What kind of [`InboxError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InboxErrorKind {
    /// The cluster could not serve the bucket (peers offline, no quorum).
    ClusterUnavailable,
    /// No answer in time.
    TimedOut,
    /// The server refused for permissions.
    PermissionDenied,
    /// Anything else.
    Other,
}

impl InboxError {
    pub(super) fn new(
        client: &async_nats::Client,
        bucket: &str,
        what: impl Into<String>,
        e: Option<Source>,
    ) -> Self {
        let cause = e.as_deref().map_or(Cause::Other, |e| Cause::of(e));
        let kind = if recent_permission_error(client).is_some() {
            InboxErrorKind::PermissionDenied
        } else if cause.cluster_unavailable() {
            InboxErrorKind::ClusterUnavailable
        } else if cause == Cause::TimedOut {
            InboxErrorKind::TimedOut
        } else {
            InboxErrorKind::Other
        };
        Self {
            bucket: bucket.to_owned(),
            what: what.into(),
            source: e,
            kind,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> InboxErrorKind {
        self.kind
    }

    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            InboxErrorKind::ClusterUnavailable | InboxErrorKind::TimedOut
        )
    }
}

crate::debug_as_display!(InboxError);
