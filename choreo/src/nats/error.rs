//! [`ConnectError`], and the helpers every module uses to read a NATS error:
//! URL redaction and the JetStream error codes that mean "try again".

use std::sync::Arc;

use async_nats::jetstream;

/// A NATS connection could not be made.
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a NATS URL.
    #[error("invalid NATS URL {url:?}: {reason}; expected e.g. nats://127.0.0.1:4222")]
    InvalidUrl {
        /// The URL, with any password removed.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No server answered.
    #[error(
        "cannot reach a NATS server at {url}: {source}; is nats-server running and the address right?"
    )]
    Unreachable {
        /// The URL, with any password removed.
        url: String,
        /// What the client said.
        #[source]
        source: Source,
    },
    /// The server refused the credentials.
    #[error(
        "the NATS server at {url} refused the credentials ({source}); check the user, token, nkey or creds file"
    )]
    Auth {
        /// The URL, with any password removed.
        url: String,
        /// What the server said.
        #[source]
        source: Source,
    },
    /// TLS could not be set up.
    #[error("TLS with the NATS server at {url} failed: {source}")]
    Tls {
        /// The URL, with any password removed.
        url: String,
        /// What failed.
        #[source]
        source: Source,
    },
}

/// What kind of [`ConnectError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// [`ConnectError::InvalidUrl`].
    InvalidUrl,
    /// [`ConnectError::Unreachable`].
    Unreachable,
    /// [`ConnectError::Auth`].
    Auth,
    /// [`ConnectError::Tls`].
    Tls,
}

impl ConnectError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ConnectErrorKind {
        match self {
            Self::InvalidUrl { .. } => ConnectErrorKind::InvalidUrl,
            Self::Unreachable { .. } => ConnectErrorKind::Unreachable,
            Self::Auth { .. } => ConnectErrorKind::Auth,
            Self::Tls { .. } => ConnectErrorKind::Tls,
        }
    }
}

crate::debug_as_display!(ConnectError);

/// Removes `user:password@` from a URL for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// JetStream error codes that say a cluster cannot serve a request right
/// now, and will when its nodes are back.
pub(crate) fn is_cluster_unavailable(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode as C;
    [
        C::CLUSTER_NO_PEERS,
        C::CLUSTER_NOT_AVAILABLE,
        C::CLUSTER_INCOMPLETE,
        C::CLUSTER_NOT_ASSIGNED,
        C::CLUSTER_NOT_LEADER,
        C::CLUSTER_NOT_ACTIVE,
    ]
    .contains(&code)
}

/// Whether a JetStream error code says a write guarded by
/// `Nats-Expected-Last-Subject-Sequence` (a compare-and-set) was refused
/// because its subject moved on: the wrong last sequence (10071), or the
/// same without a number (10164), which a cluster's stream leader answers
/// while another guarded write of the same subject is still being
/// replicated. Both are conflicts: read the subject again and retry.
pub(crate) fn moved_on_code(code: jetstream::ErrorCode) -> bool {
    use jetstream::ErrorCode as C;
    code == C::STREAM_WRONG_LAST_SEQUENCE || code == C::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
}

/// [`moved_on_code`] of an async-nats error, read from its chain: async-nats
/// gives 10164 as an error of kind `Other`.
pub(crate) fn moved_on(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(Cause::of(e), Cause::Code(code) if moved_on_code(code))
}

/// What an async-nats error comes down to, read from its kinds (never its
/// text): the classes choreo acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// No answer in time (a leader election, a slow node, or a request the
    /// server refused for permissions, which it reports only asynchronously).
    TimedOut,
    /// Nobody serves the subject: no JetStream here, or none in this domain.
    NoResponders,
    /// The server answered with this JetStream error.
    Code(jetstream::ErrorCode),
    /// Anything else.
    Other,
}

impl Cause {
    /// Reads the first error in `e`'s chain whose kind says something.
    pub(crate) fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        use jetstream::context as c;
        let mut next = Some(e);
        while let Some(e) = next {
            let cause = if let Some(e) = e.downcast_ref::<c::RequestError>() {
                match e.kind() {
                    c::RequestErrorKind::TimedOut => Self::TimedOut,
                    c::RequestErrorKind::NoResponders => Self::NoResponders,
                    _ => Self::Other,
                }
            } else if let Some(e) = e.downcast_ref::<c::GetStreamError>() {
                match e.kind() {
                    c::GetStreamErrorKind::JetStream(j) => Self::Code(j.error_code()),
                    _ => Self::Other,
                }
            } else if let Some(e) = e.downcast_ref::<c::CreateStreamError>() {
                match e.kind() {
                    c::CreateStreamErrorKind::JetStream(j) => Self::Code(j.error_code()),
                    c::CreateStreamErrorKind::TimedOut => Self::TimedOut,
                    c::CreateStreamErrorKind::JetStreamUnavailable => Self::NoResponders,
                    _ => Self::Other,
                }
            } else if let Some(e) = e.downcast_ref::<c::AccountError>() {
                match e.kind() {
                    c::AccountErrorKind::JetStream(j) => Self::Code(j.error_code()),
                    c::AccountErrorKind::TimedOut => Self::TimedOut,
                    c::AccountErrorKind::JetStreamUnavailable => Self::NoResponders,
                    _ => Self::Other,
                }
            } else if let Some(e) = e.downcast_ref::<jetstream::stream::ConsumerError>() {
                match e.kind() {
                    jetstream::stream::ConsumerErrorKind::JetStream(j) => {
                        Self::Code(j.error_code())
                    }
                    jetstream::stream::ConsumerErrorKind::TimedOut => Self::TimedOut,
                    _ => Self::Other,
                }
            } else if let Some(e) = e.downcast_ref::<c::ConsumerInfoError>() {
                match e.kind() {
                    c::ConsumerInfoErrorKind::JetStream(j) => Self::Code(j.error_code()),
                    c::ConsumerInfoErrorKind::TimedOut => Self::TimedOut,
                    c::ConsumerInfoErrorKind::NoResponders => Self::NoResponders,
                    _ => Self::Other,
                }
            } else if let Some(j) = e.downcast_ref::<jetstream::Error>() {
                Self::Code(j.error_code())
            } else {
                Self::Other
            };
            if cause != Self::Other {
                return cause;
            }
            next = e.source();
        }
        Self::Other
    }

    /// Whether the cluster cannot serve the request right now.
    pub(crate) fn cluster_unavailable(self) -> bool {
        matches!(self, Self::Code(code) if is_cluster_unavailable(code))
    }

    /// Whether JetStream is off (or absent in this domain).
    pub(crate) fn jetstream_off(self) -> bool {
        use jetstream::ErrorCode as C;
        matches!(self, Self::NoResponders)
            || matches!(self, Self::Code(c) if c == C::JETSTREAM_NOT_ENABLED
                || c == C::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT)
    }
}

/// The cause of a choreo error: the error async-nats (or the server)
/// gave, shared so that choreo's errors can be cloned. It dereferences to
/// that error, so `source()` of a choreo error returns it and a caller can
/// `downcast_ref` it to its async-nats type.
#[derive(Clone)]
pub struct Source(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl std::ops::Deref for Source {
    type Target = dyn std::error::Error + Send + Sync + 'static;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for Source {
    fn from(e: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        Self(Arc::from(e))
    }
}

/// Wraps any error as a [`Source`].
pub(crate) fn source(e: impl std::error::Error + Send + Sync + 'static) -> Source {
    Source(Arc::new(e))
}

/// A plain message as a [`Source`], for failures choreo itself detects.
pub(crate) fn message(text: impl Into<String>) -> Source {
    Source(Arc::new(crate::event::error::Message(text.into())))
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::{self, context::PublishError, context::PublishErrorKind, kv};

    use super::moved_on;

    /// A PubAck's error as async-nats gives it for `err_code`.
    fn refused(err_code: u64) -> PublishError {
        let kind = if err_code == 10071 {
            PublishErrorKind::WrongLastSequence
        } else {
            PublishErrorKind::Other
        };
        let answer: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400,
            "err_code": err_code,
            "description": "wrong last sequence",
        }))
        .unwrap_or_else(|e| panic!("an API error: {e}"));
        PublishError::with_source(kind, answer)
    }

    #[test]
    fn a_write_behind_another_in_flight_is_a_conflict_like_a_wrong_sequence() {
        assert!(moved_on(&refused(10071)));
        // A cluster's leader while another write of the key replicates.
        assert!(moved_on(&refused(10164)));
        // Through a key-value update, which wraps the publish's error.
        assert!(moved_on(&kv::UpdateError::from(refused(10164))));
        // Anything else is not: a duplicate, a stream that is gone.
        assert!(!moved_on(&refused(10070)));
        assert!(!moved_on(&refused(10059)));
        assert!(!moved_on(&PublishError::new(PublishErrorKind::TimedOut)));
    }
}
