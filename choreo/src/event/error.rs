//! What can go wrong turning a value into an event message, or a message
//! back into an event.

use std::sync::Arc;

/// The serializer's or deserializer's own error, kept as the source of an
/// [`EncodeError`] or a [`DecodeError`]. Two are equal when they say the
/// same thing.
#[derive(Clone)]
pub struct CodecFailure(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl CodecFailure {
    pub(crate) fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(e))
    }
    pub(crate) fn message(text: String) -> Self {
        Self(Arc::new(Message(text)))
    }
}

/// A failure choreo itself detects, as an error with only its text.
#[derive(Debug)]
pub(crate) struct Message(pub(crate) String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

impl PartialEq for CodecFailure {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}
impl Eq for CodecFailure {}

impl std::fmt::Display for CodecFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::fmt::Debug for CodecFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::ops::Deref for CodecFailure {
    type Target = dyn std::error::Error + Send + Sync + 'static;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// An event could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {event} as CBOR: {source}")]
#[non_exhaustive]
pub struct EncodeError {
    /// The event's name.
    pub event: &'static str,
    /// What the serializer reported.
    #[source]
    pub source: CodecFailure,
}

/// A received message could not be read as an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A header is missing or malformed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The message carries another event type than the one asked for.
    #[error("expected event type {expected}, got {got:?} in ce-type")]
    WrongType {
        /// The name the reader expected.
        expected: &'static str,
        /// The `ce-type` it found.
        got: String,
    },
    /// The schema version is not one this build can read.
    #[error("{event} version {got} is unknown here: {}", unknown_version_hint(*.got, *.newest))]
    UnknownVersion {
        /// The event's name.
        event: &'static str,
        /// The version in `ce-eventversion`.
        got: u32,
        /// The newest version this build reads.
        newest: u32,
    },
    /// The payload is not valid CBOR for the type.
    #[error("payload of {event} version {version} is not valid CBOR for the type: {source}")]
    Payload {
        /// The event's name.
        event: &'static str,
        /// The version it was decoded as.
        version: u32,
        /// What the deserializer reported.
        #[source]
        source: CodecFailure,
    },
}

/// What kind of [`DecodeError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// [`DecodeError::Header`].
    Header,
    /// [`DecodeError::WrongType`].
    WrongType,
    /// [`DecodeError::UnknownVersion`].
    UnknownVersion,
    /// [`DecodeError::Payload`].
    Payload,
}

impl DecodeError {
    /// What kind of failure this is.
    pub fn kind(&self) -> DecodeErrorKind {
        match self {
            Self::Header(_) => DecodeErrorKind::Header,
            Self::WrongType { .. } => DecodeErrorKind::WrongType,
            Self::UnknownVersion { .. } => DecodeErrorKind::UnknownVersion,
            Self::Payload { .. } => DecodeErrorKind::Payload,
        }
    }

    /// A short, stable reason code, written into dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Header(_) => "bad-header",
            Self::WrongType { .. } => "wrong-type",
            Self::UnknownVersion { .. } => "unknown-version",
            Self::Payload { .. } => "undecodable-payload",
        }
    }
}

fn unknown_version_hint(got: u32, newest: u32) -> String {
    if got > newest {
        format!(
            "it is newer than this build knows (up to {newest}); deploy a build that has the new type"
        )
    } else {
        format!(
            "this build reads up to version {newest} and has no `upcast_from` type for version {got}"
        )
    }
}

/// A header is missing or malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// A required header is absent.
    #[error("header `{header}` is missing")]
    Missing {
        /// The header's name.
        header: &'static str,
    },
    /// A header's value is not what the wire format allows.
    #[error("header `{header}` has value {value:?}, expected {expected}")]
    Malformed {
        /// The header's name.
        header: &'static str,
        /// The value found (every value, joined by `, `, when it appears more than once).
        value: String,
        /// What the wire format allows there.
        expected: &'static str,
    },
}

/// What kind of [`HeaderError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderErrorKind {
    /// [`HeaderError::Missing`].
    Missing,
    /// [`HeaderError::Malformed`].
    Malformed,
}

impl HeaderError {
    /// What kind of failure this is.
    pub fn kind(&self) -> HeaderErrorKind {
        match self {
            Self::Missing { .. } => HeaderErrorKind::Missing,
            Self::Malformed { .. } => HeaderErrorKind::Malformed,
        }
    }
}
