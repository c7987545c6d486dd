//! [`PublishError`]: why an event was not stored.

use async_nats::jetstream;

use crate::event::{EncodeError, HeaderError, SubjectError};
use crate::nats::{Source, recent_permission_error, source};
use crate::topology::StreamError;
use crate::wire::envelope::EnvelopeError;

/// Publishing an event failed.
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The subject could not be rendered.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The payload could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A header value is not allowed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The message is larger than the server's `max_payload`; nothing was sent.
    #[error(
        "{event} is {size} bytes with headers, above the server's max_payload of {max} bytes; nothing was sent. \
         Store large data elsewhere and put a reference in the event, or raise max_payload on the server"
    )]
    TooLarge {
        /// The event's name.
        event: &'static str,
        /// The message size.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// The event's stream could not be made ready.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// JetStream already holds an event with this id (the same key) inside
    /// its duplicate window, with different content: the new one was not
    /// stored. A corrected fact is a new fact (its own key), or carries a
    /// revision in its key.
    #[error(
        "{event} with key ({key}) is already in stream {stream} at sequence {sequence} with different content, \
         so this one was not stored (event id {id}). One key is one fact: publish a correction as a new event \
         with its own key, or put a revision in the key"
    )]
    Conflict {
        /// The event's name.
        event: &'static str,
        /// The key's values, comma-separated.
        key: String,
        /// The event id both share.
        id: crate::EventId,
        /// Where the stored one is.
        stream: String,
        /// Its sequence there.
        sequence: u64,
    },
    /// A handler that declares what it emits emitted another type. Its
    /// event is dead-lettered (reason `emit-failed`), nothing is published.
    #[error(
        "handler {handler} emitted {event}, which its `#[event_handler(emits = [{}])]` does not declare: \
         add {event} to `emits`, or emit one of the declared types",
        declared.join(", ")
    )]
    Undeclared {
        /// The event's name.
        event: &'static str,
        /// The handler, `<service>.<handler>`.
        handler: String,
        /// The names it declares.
        declared: Vec<&'static str>,
    },
    /// JetStream did not store the event.
    #[error("publishing {event} on {subject} failed: {source}{}", denied.as_ref().map(|p| format!("; the server reported: {p}")).unwrap_or_default())]
    Failed {
        /// The event's name.
        event: &'static str,
        /// The subject.
        subject: String,
        /// The permission violation the server reported on this connection
        /// just before, if any.
        denied: Option<String>,
        /// What JetStream or the client said.
        #[source]
        source: Source,
    },
}

/// What kind of [`PublishError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// [`PublishError::Subject`].
    Subject,
    /// [`PublishError::Encode`].
    Encode,
    /// [`PublishError::Header`].
    Header,
    /// [`PublishError::TooLarge`].
    TooLarge,
    /// [`PublishError::Stream`].
    Stream,
    /// [`PublishError::Conflict`].
    Conflict,
    /// [`PublishError::Undeclared`].
    Undeclared,
    /// [`PublishError::Failed`] with a permission violation reported.
    PermissionDenied,
    /// [`PublishError::Failed`] otherwise.
    Failed,
}

impl PublishError {
    /// What kind of failure this is.
    pub fn kind(&self) -> PublishErrorKind {
        match self {
            Self::Subject(_) => PublishErrorKind::Subject,
            Self::Encode(_) => PublishErrorKind::Encode,
            Self::Header(_) => PublishErrorKind::Header,
            Self::TooLarge { .. } => PublishErrorKind::TooLarge,
            Self::Stream(_) => PublishErrorKind::Stream,
            Self::Conflict { .. } => PublishErrorKind::Conflict,
            Self::Undeclared { .. } => PublishErrorKind::Undeclared,
            Self::Failed {
                denied: Some(_), ..
            } => PublishErrorKind::PermissionDenied,
            Self::Failed { .. } => PublishErrorKind::Failed,
        }
    }

    pub(crate) fn from_nats(
        client: &async_nats::Client,
        event: &'static str,
        subject: &str,
        e: jetstream::context::PublishError,
    ) -> Self {
        Self::Failed {
            event,
            subject: subject.to_owned(),
            denied: recent_permission_error(client),
            source: source(e),
        }
    }
}

impl From<EnvelopeError> for PublishError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Subject(e) => Self::Subject(e),
            EnvelopeError::Encode(e) => Self::Encode(e),
            EnvelopeError::Header(e) => Self::Header(e),
        }
    }
}

crate::debug_as_display!(PublishError);
