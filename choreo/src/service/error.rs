//! [`StartError`] and [`RunError`]: why a service did not start, or stopped.

use std::time::Duration;

use crate::handler::MissingState;
use crate::nats::ConnectError;
use crate::topology::{ConsumerError, StreamError};

/// A service failed to start. Nothing was left running.
///
/// `{:?}` prints the message (so a test returning it reads well); `{:#?}`
/// the fields.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The connection could not be made ([`Service::connect_and_start`](crate::Service::connect_and_start), [`Service::connect_and_run`](crate::Service::connect_and_run)).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The service name is not allowed.
    #[error(
        "service name {name:?} is not allowed: use 1 to 64 characters from A-Z, a-z, 0-9, `-` and `_` \
         (it becomes part of consumer names and subjects)"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// Two handlers share a name.
    #[error(
        "two handlers of service {service} are named {handler:?}: give one `#[event_handler(name = \"...\")]`"
    )]
    DuplicateHandler {
        /// The service.
        service: String,
        /// The name.
        handler: String,
    },
    /// A handler's options are out of range.
    #[error("handler {handler}: {problem}")]
    InvalidOptions {
        /// The handler.
        handler: String,
        /// What is wrong.
        problem: String,
    },
    /// A handler needs state the service does not have.
    #[error("handler {handler} needs state the service lacks: {missing}")]
    MissingState {
        /// The handler.
        handler: String,
        /// The missing state.
        missing: MissingState,
    },
    /// A stream could not be made ready.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A consumer could not be created.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The inbox bucket could not be opened or created.
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
}

/// What kind of [`StartError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartErrorKind {
    /// [`StartError::Connect`].
    Connect,
    /// [`StartError::InvalidName`].
    InvalidName,
    /// [`StartError::DuplicateHandler`].
    DuplicateHandler,
    /// [`StartError::InvalidOptions`].
    InvalidOptions,
    /// [`StartError::MissingState`].
    MissingState,
    /// [`StartError::Stream`].
    Stream,
    /// [`StartError::Consumer`].
    Consumer,
    /// [`StartError::Inbox`].
    Inbox,
}

impl StartError {
    /// What kind of failure this is.
    pub fn kind(&self) -> StartErrorKind {
        match self {
            Self::Connect(_) => StartErrorKind::Connect,
            Self::InvalidName { .. } => StartErrorKind::InvalidName,
            Self::DuplicateHandler { .. } => StartErrorKind::DuplicateHandler,
            Self::InvalidOptions { .. } => StartErrorKind::InvalidOptions,
            Self::MissingState { .. } => StartErrorKind::MissingState,
            Self::Stream(_) => StartErrorKind::Stream,
            Self::Consumer(_) => StartErrorKind::Consumer,
            Self::Inbox(_) => StartErrorKind::Inbox,
        }
    }

    /// Whether starting again may succeed: a timeout or a cluster that
    /// cannot serve right now (never a permission denial, which is reported
    /// as such, nor a bad name or option).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Stream(e) => e.is_transient(),
            Self::Consumer(e) => e.is_transient(),
            Self::Inbox(e) => e.is_transient(),
            _ => false,
        }
    }
}

crate::debug_as_display!(StartError);

/// A service stopped with an error, or could not start.
///
/// `{:?}` prints the message; `{:#?}` the fields.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// It could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A handler's consumer disappeared and could not be recreated.
    #[error(
        "service {service}, handler {handler}: its consumer could not be recreated for {failing_for:?} \
         ({source}); the service stopped. Check that the stream exists and the service may create consumers, \
         then start it again"
    )]
    ConsumerLost {
        /// The service.
        service: String,
        /// The handler.
        handler: String,
        /// How long recreating it failed.
        failing_for: Duration,
        /// The last failure.
        #[source]
        source: ConsumerError,
    },
    /// The inbox bucket was deleted and did not come back.
    #[error(
        "service {service}: its inbox bucket {bucket} has been missing for {missing_for:?}; the service stopped. \
         Starting it again creates an empty bucket, which forgets which events were handled: \
         events still in their streams may be handled again"
    )]
    InboxLost {
        /// The service.
        service: String,
        /// The bucket.
        bucket: String,
        /// How long look-ups had failed.
        missing_for: Duration,
    },
    /// A task of the service panicked (a bug in choreo).
    #[error("service {service}: a task panicked: {panic}")]
    Panicked {
        /// The service.
        service: String,
        /// The panic's message.
        panic: String,
    },
}

/// What kind of [`RunError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunErrorKind {
    /// [`RunError::Start`].
    Start,
    /// [`RunError::ConsumerLost`].
    ConsumerLost,
    /// [`RunError::InboxLost`].
    InboxLost,
    /// [`RunError::Panicked`].
    Panicked,
}

impl RunError {
    /// What kind of failure this is.
    pub fn kind(&self) -> RunErrorKind {
        match self {
            Self::Start(_) => RunErrorKind::Start,
            Self::ConsumerLost { .. } => RunErrorKind::ConsumerLost,
            Self::InboxLost { .. } => RunErrorKind::InboxLost,
            Self::Panicked { .. } => RunErrorKind::Panicked,
        }
    }

    pub(crate) fn stopped(service: &str, stopped: crate::runtime::Stopped) -> Self {
        use crate::runtime::Stopped;
        let service = service.to_owned();
        match stopped {
            Stopped::ConsumerLost {
                handler,
                failing_for,
                source,
            } => Self::ConsumerLost {
                service,
                handler,
                failing_for,
                source,
            },
            Stopped::InboxLost {
                bucket,
                missing_for,
            } => Self::InboxLost {
                service,
                bucket,
                missing_for,
            },
        }
    }
}

crate::debug_as_display!(RunError);
