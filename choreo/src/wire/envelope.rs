//! [`Envelope`]: an event together with its subject and metadata, and the
//! conversion to and from one JetStream message.

use std::ops::Deref;

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::event::{DecodeError, EncodeError, Event, HeaderError, SubjectError};
use crate::wire::codec;
use crate::wire::headers::Metadata;

/// An event with its subject and the metadata its headers carry.
///
/// Handlers may take `Envelope<E>` instead of `E` to see the metadata; it
/// dereferences to the event.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope<E> {
    event: E,
    meta: Metadata,
    subject: String,
}

/// An event could not be turned into a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The subject could not be rendered.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The payload could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A header value is not allowed.
    #[error(transparent)]
    Header(#[from] HeaderError),
}

/// What kind of [`EnvelopeError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EnvelopeErrorKind {
    /// [`EnvelopeError::Subject`].
    Subject,
    /// [`EnvelopeError::Encode`].
    Encode,
    /// [`EnvelopeError::Header`].
    Header,
}

impl EnvelopeError {
    /// What kind of failure this is.
    pub fn kind(&self) -> EnvelopeErrorKind {
        match self {
            Self::Subject(_) => EnvelopeErrorKind::Subject,
            Self::Encode(_) => EnvelopeErrorKind::Encode,
            Self::Header(_) => EnvelopeErrorKind::Header,
        }
    }
}

impl<E: Event> Envelope<E> {
    /// Wraps `event` with `meta`, rendering its subject.
    ///
    /// # Errors
    /// A subject field whose value is not a legal NATS token.
    pub fn new(event: E, meta: Metadata) -> Result<Self, SubjectError> {
        let subject = event.subject()?;
        Ok(Self {
            event,
            meta,
            subject,
        })
    }

    /// Reads a message as an `E`: validates the headers, checks `ce-type`,
    /// and decodes the payload of the version `ce-eventversion` names
    /// (following `upcast_from`).
    ///
    /// # Errors
    /// The first problem found, as a [`DecodeError`].
    pub fn decode(subject: &str, headers: &HeaderMap, payload: &[u8]) -> Result<Self, DecodeError> {
        let meta = Metadata::from_headers(headers)?;
        if meta.event_type() != E::NAME {
            return Err(DecodeError::WrongType {
                expected: E::NAME,
                got: meta.event_type().to_owned(),
            });
        }
        let event = codec::decode::<E>(meta.version(), payload)?;
        Ok(Self {
            event,
            meta,
            subject: subject.to_owned(),
        })
    }

    /// The message's headers and CBOR payload.
    ///
    /// # Errors
    /// The event's `Serialize` impl failed.
    pub fn to_message(&self) -> Result<(HeaderMap, Bytes), EncodeError> {
        let payload = codec::encode(&self.event)?;
        Ok((self.meta.to_headers(), Bytes::from(payload)))
    }
}

impl<E> Envelope<E> {
    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }
    /// The event, unwrapped.
    pub fn into_event(self) -> E {
        self.event
    }
    /// The event and its metadata.
    pub fn into_parts(self) -> (E, Metadata) {
        (self.event, self.meta)
    }
    /// The metadata from the headers.
    pub fn meta(&self) -> &Metadata {
        &self.meta
    }
    /// The subject the event was (or will be) published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl<E> Deref for Envelope<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.event
    }
}
