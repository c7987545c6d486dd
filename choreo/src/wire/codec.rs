//! The payload codec: events travel as CBOR (RFC 8949), written by `ciborium`
//! from the type's serde shape — a struct is a map keyed by field name.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::error::CodecFailure;
use crate::event::{DecodeError, EncodeError, Event};

/// The `content-type` of every choreo payload.
pub const CONTENT_TYPE: &str = "application/cbor";

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
        source: CodecFailure::new(e),
    })?;
    Ok(out)
}

/// Decodes one CBOR value of type `T`; what `#[event]` generates for
/// [`Event::decode_payload`] calls it.
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
        source: CodecFailure::new(e),
    })?;
    if !reader.is_empty() {
        return Err(DecodeError::Payload {
            event,
            version,
            source: CodecFailure::message(format!(
                "{} trailing bytes after the CBOR value",
                reader.len()
            )),
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
