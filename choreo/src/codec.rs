//! The payload codec: events travel as CBOR (RFC 8949), written by `ciborium`
//! from the type's serde shape — a struct is a map keyed by field name.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Event;
use crate::headers::HeaderError;

/// The `content-type` of every choreo payload.
pub const CONTENT_TYPE: &str = "application/cbor";

/// An event could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {event} as CBOR: {reason}")]
#[non_exhaustive]
pub struct EncodeError {
    /// The event's name.
    pub event: &'static str,
    /// What the serializer reported.
    pub reason: String,
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
    #[error("payload of {event} version {version} is not valid CBOR for the type: {reason}")]
    Payload {
        /// The event's name.
        event: &'static str,
        /// The version it was decoded as.
        version: u32,
        /// What the deserializer reported.
        reason: String,
    },
}

impl DecodeError {
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

/// Encodes a value as CBOR.
///
/// # Errors
/// The value's `Serialize` impl failed.
pub fn encode<E: Event>(event: &E) -> Result<Vec<u8>, EncodeError> {
    encode_cbor(E::NAME, event)
}

/// Decodes a payload of schema `version` as `E`, following its `upcast_from`
/// chain.
///
/// # Errors
/// An unknown version, or a payload that does not decode.
pub fn decode<E: Event>(version: u32, payload: &[u8]) -> Result<E, DecodeError> {
    E::decode_payload(version, payload)
}

pub(crate) fn encode_cbor<T: Serialize + ?Sized>(
    event: &'static str,
    value: &T,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    ciborium::into_writer(value, &mut out).map_err(|e| EncodeError {
        event,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes one CBOR value of type `T`; used by [`Event::decode_payload`].
///
/// # Errors
/// The payload is not a CBOR encoding of `T`, or has trailing bytes.
pub fn decode_cbor<T: DeserializeOwned>(
    event: &'static str,
    version: u32,
    payload: &[u8],
) -> Result<T, DecodeError> {
    let mut reader = payload;
    let value = ciborium::from_reader(&mut reader).map_err(|e| DecodeError::Payload {
        event,
        version,
        reason: e.to_string(),
    })?;
    if !reader.is_empty() {
        return Err(DecodeError::Payload {
            event,
            version,
            reason: format!("{} trailing bytes after the CBOR value", reader.len()),
        });
    }
    Ok(value)
}

/// The error for a version `E` cannot read.
pub fn unknown_version<E: Event>(got: u32) -> DecodeError {
    DecodeError::UnknownVersion {
        event: E::NAME,
        got,
        newest: E::VERSION,
    }
}
