//! The wire format: how an event travels as a NATS message. Headers carry
//! its identity ([`headers`], [`Metadata`](crate::Metadata)), the payload is
//! CBOR ([`codec`]), and an [`Envelope`](crate::Envelope) holds both
//! decoded. `docs/wire-format.md` is the specification.

pub(crate) mod codec;
pub(crate) mod envelope;
pub(crate) mod headers;
