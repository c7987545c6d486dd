//! [`StreamError`] and [`ConsumerError`]: what choreo could not create or
//! use on the server. Both are read from async-nats error kinds and JetStream
//! error codes, never from message text.

use async_nats::jetstream;

use crate::nats::{Cause, Source, recent_permission_error, source};

/// A stream could not be found, created or used.
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The server has no JetStream (or none in the JetStream domain asked for).
    #[error(
        "JetStream is not available on this server ({source}): start nats-server with `-js`, or add \
         `jetstream {{}}` to its configuration; with a JetStream domain, check the domain's name"
    )]
    JetStreamUnavailable {
        /// What the server or client said.
        #[source]
        source: Source,
    },
    /// An existing stream does not store the event's subjects.
    #[error(
        "stream {stream} exists with subjects {subjects:?}, which do not cover {needed:?}: add the subject to the \
         stream, or give the event another `stream = \"...\"` (with `stream_subjects = \"{needed}\"` if another \
         stream stores its first token)"
    )]
    DoesNotCover {
        /// The stream.
        stream: String,
        /// Its subjects.
        subjects: Vec<String>,
        /// The event's subject filter.
        needed: String,
    },
    /// Its subjects overlap another stream's.
    #[error(
        "cannot create stream {stream}: its subjects {subjects:?} overlap another stream's ({source}); \
         give the event `stream = \"...\"` naming that stream, or make the two streams' subjects disjoint \
         (`stream_subjects` on the event types that share a first token)"
    )]
    Overlap {
        /// The stream.
        stream: String,
        /// The subjects it would have had.
        subjects: Vec<String>,
        /// What the server said.
        #[source]
        source: Source,
    },
    /// The server refused the request because of permissions.
    #[error(
        "permission denied while using stream {stream}: {violation}; `Service::permissions()` lists \
         every subject a service needs"
    )]
    PermissionDenied {
        /// The stream.
        stream: String,
        /// The server's report, naming the subject.
        violation: String,
        /// The failed request.
        #[source]
        source: Source,
    },
    /// The cluster cannot serve the stream right now: peers offline, no
    /// quorum, no leader. It passes when the nodes are back.
    #[error(
        "stream {stream}: the cluster cannot serve it right now ({source}); it passes when its nodes are back"
    )]
    ClusterUnavailable {
        /// The stream.
        stream: String,
        /// What the server said.
        #[source]
        source: Source,
    },
    /// No answer in time (a leader election, a slow server).
    #[error("stream {stream}: no answer in time ({source})")]
    TimedOut {
        /// The stream.
        stream: String,
        /// The request that timed out.
        #[source]
        source: Source,
    },
    /// Any other failure.
    #[error("stream {stream}: {source}")]
    Other {
        /// The stream.
        stream: String,
        /// What went wrong.
        #[source]
        source: Source,
    },
}

/// What kind of [`StreamError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamErrorKind {
    /// [`StreamError::JetStreamUnavailable`].
    JetStreamUnavailable,
    /// [`StreamError::DoesNotCover`].
    DoesNotCover,
    /// [`StreamError::Overlap`].
    Overlap,
    /// [`StreamError::PermissionDenied`].
    PermissionDenied,
    /// [`StreamError::ClusterUnavailable`].
    ClusterUnavailable,
    /// [`StreamError::TimedOut`].
    TimedOut,
    /// [`StreamError::Other`].
    Other,
}

impl StreamError {
    /// What kind of failure this is.
    pub fn kind(&self) -> StreamErrorKind {
        match self {
            Self::JetStreamUnavailable { .. } => StreamErrorKind::JetStreamUnavailable,
            Self::DoesNotCover { .. } => StreamErrorKind::DoesNotCover,
            Self::Overlap { .. } => StreamErrorKind::Overlap,
            Self::PermissionDenied { .. } => StreamErrorKind::PermissionDenied,
            Self::ClusterUnavailable { .. } => StreamErrorKind::ClusterUnavailable,
            Self::TimedOut { .. } => StreamErrorKind::TimedOut,
            Self::Other { .. } => StreamErrorKind::Other,
        }
    }

    /// Whether trying again later can succeed (an election, nodes down).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            StreamErrorKind::ClusterUnavailable | StreamErrorKind::TimedOut
        )
    }

    /// Classifies a failed request on `stream` by its kinds: JetStream off,
    /// the cluster unavailable, a permission the server reported on this
    /// connection, a timeout, or other.
    pub(crate) fn from_nats(
        client: &async_nats::Client,
        stream: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let cause = Cause::of(&e);
        let stream = stream.to_owned();
        let source = source(e);
        if cause.jetstream_off() {
            return Self::JetStreamUnavailable { source };
        }
        if cause.cluster_unavailable() {
            return Self::ClusterUnavailable { stream, source };
        }
        if let Some(violation) = recent_permission_error(client) {
            return Self::PermissionDenied {
                stream,
                violation,
                source,
            };
        }
        if cause == Cause::TimedOut {
            return Self::TimedOut { stream, source };
        }
        Self::Other { stream, source }
    }

    pub(crate) fn from_create(
        client: &async_nats::Client,
        stream: &str,
        subjects: &[String],
        e: jetstream::context::CreateStreamError,
    ) -> Self {
        if Cause::of(&e) == Cause::Code(jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP) {
            return Self::Overlap {
                stream: stream.to_owned(),
                subjects: subjects.to_vec(),
                source: source(e),
            };
        }
        Self::from_nats(client, stream, e)
    }
}

crate::debug_as_display!(StreamError);

/// A handler's consumer could not be created or found.
///
/// `{:?}` prints the message; `{:#?}` the fields.
#[derive(Clone, thiserror::Error)]
#[error(
    "cannot create consumer {consumer} on stream {stream} for handler {handler}: {source}{}",
    denied.as_ref().map(|p| format!("; the server reported: {p}")).unwrap_or_default()
)]
#[non_exhaustive]
pub struct ConsumerError {
    /// The handler.
    pub handler: String,
    /// The stream.
    pub stream: String,
    /// The durable consumer's name.
    pub consumer: String,
    /// The permission violation the server reported on this connection just
    /// before, if any.
    pub denied: Option<String>,
    /// What the server or client said.
    #[source]
    pub source: Source,
    kind: ConsumerErrorKind,
}

/// What kind of [`ConsumerError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConsumerErrorKind {
    /// The stream does not exist.
    StreamNotFound,
    /// The server refused for permissions.
    PermissionDenied,
    /// The cluster cannot serve it right now.
    ClusterUnavailable,
    /// No answer in time.
    TimedOut,
    /// Anything else.
    Other,
}

impl ConsumerError {
    pub(crate) fn new(
        client: &async_nats::Client,
        handler: &str,
        stream: &str,
        consumer: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let cause = Cause::of(&e);
        let denied = recent_permission_error(client);
        let kind = if denied.is_some() {
            ConsumerErrorKind::PermissionDenied
        } else if cause == Cause::Code(jetstream::ErrorCode::STREAM_NOT_FOUND) {
            ConsumerErrorKind::StreamNotFound
        } else if cause.cluster_unavailable() {
            ConsumerErrorKind::ClusterUnavailable
        } else if cause == Cause::TimedOut {
            ConsumerErrorKind::TimedOut
        } else {
            ConsumerErrorKind::Other
        };
        Self {
            handler: handler.to_owned(),
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            denied,
            source: source(e),
            kind,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ConsumerErrorKind {
        self.kind
    }

    /// Whether trying again later can succeed (an election, nodes down).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            ConsumerErrorKind::ClusterUnavailable | ConsumerErrorKind::TimedOut
        )
    }
}

crate::debug_as_display!(ConsumerError);
