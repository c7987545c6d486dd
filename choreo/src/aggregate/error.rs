//! What can go wrong when loading an aggregate or deciding on it.

use std::fmt;

use crate::nats::Source;

/// What kind of [`AggregateError`] it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AggregateErrorKind {
    /// The aggregate's event types are not all in one stream, or the stream
    /// cannot be created or set up for aggregates.
    Stream,
    /// The history could not be read (no answer, no responders, refused).
    Read,
    /// A stored event could not be decoded.
    Decode,
    /// An event on the aggregate's subjects is of a type its event enum does
    /// not list: this code cannot fold it, so it does not decide.
    ForeignEvent,
    /// The server refused the append for another reason than a conflict.
    Append,
    /// A decision returned more events than one atomic batch holds (1,000).
    TooManyEvents,
    /// The decision cannot be made as asked: an instance named twice, or a
    /// decision across instances that appends fewer events than the
    /// instances it guards.
    Usage,
}

/// Loading or appending failed for a reason other than a conflict.
#[derive(thiserror::Error)]
#[error("aggregate {aggregate} {id}: {detail}")]
pub struct AggregateError {
    pub(crate) aggregate: &'static str,
    pub(crate) id: String,
    pub(crate) kind: AggregateErrorKind,
    pub(crate) detail: String,
    #[source]
    pub(crate) source: Option<Source>,
}

crate::debug_as_display!(AggregateError);

impl AggregateError {
    pub(crate) fn new(
        aggregate: &'static str,
        id: &str,
        kind: AggregateErrorKind,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            aggregate,
            id: id.to_owned(),
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(source);
        self.source = Some(Source::from(boxed));
        self
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> AggregateErrorKind {
        self.kind
    }

    /// The aggregate's name ([`Aggregate::NAME`](super::Aggregate::NAME)).
    pub fn aggregate(&self) -> &'static str {
        self.aggregate
    }

    /// The instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Why a decision appended nothing.
pub enum DecideError<E> {
    /// The decision refused: its own error, as it returned it.
    Refused(E),
    /// Others appended to the aggregate each time it was loaded, `attempts`
    /// times in a row.
    Conflict {
        /// The aggregate's name.
        aggregate: &'static str,
        /// The instance's id.
        id: String,
        /// How many times it loaded and decided.
        attempts: u32,
    },
    /// Loading or appending failed.
    Failed(AggregateError),
}

impl<E: fmt::Display> fmt::Display for DecideError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(e) => write!(f, "the decision refused: {e}"),
            Self::Conflict {
                aggregate,
                id,
                attempts,
            } => write!(
                f,
                "aggregate {aggregate} {id}: others appended each of the {attempts} times it was loaded; nothing appended"
            ),
            Self::Failed(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Display> fmt::Debug for DecideError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<E: fmt::Display> std::error::Error for DecideError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl<E> From<AggregateError> for DecideError<E> {
    fn from(e: AggregateError) -> Self {
        Self::Failed(e)
    }
}

impl<E: fmt::Display> DecideError<E> {
    /// The handler error this is in a handler: a refusal, an event that
    /// cannot be decoded or folded, or a decision too large is permanent
    /// (the handled event is dead-lettered with it); a conflict or a failed
    /// read or append is retried. (`?` makes every one retryable, as for
    /// any error.)
    pub fn into_handler_error(self) -> crate::handler::HandlerError
    where
        E: Send + Sync + 'static,
    {
        let permanent = match &self {
            Self::Refused(_) => true,
            Self::Failed(f) => matches!(
                f.kind,
                AggregateErrorKind::Decode
                    | AggregateErrorKind::TooManyEvents
                    | AggregateErrorKind::Usage
                    | AggregateErrorKind::ForeignEvent
            ),
            Self::Conflict { .. } => false,
        };
        if permanent {
            crate::handler::HandlerError::permanent(self)
        } else {
            crate::handler::HandlerError::retryable(self)
        }
    }
}
