//! [`Outgoing`]: one event encoded and ready to send, with its stream.

use async_nats::HeaderMap;
use bytes::Bytes;

use super::PublishError;
use crate::event::{Event, EventId};
use crate::wire::headers::Metadata;

/// An event type's stream: its name, the subjects choreo creates it with,
/// and the type's subject filter.
#[derive(Debug)]
pub(crate) struct StreamOf {
    pub(crate) name: &'static str,
    pub(crate) subjects: &'static str,
    pub(crate) filter: &'static str,
}

/// One encoded event, ready to send.
#[derive(Clone, Debug)]
pub(crate) struct Outgoing {
    pub(crate) event: &'static str,
    pub(crate) stream: &'static StreamOf,
    pub(crate) subject: String,
    pub(crate) headers: HeaderMap,
    /// To rebuild the headers for a retry (the first attempt consumes them).
    /// Boxed, like `stream` behind a reference, to keep every publish future
    /// small: it is allocated and moved once per event.
    pub(crate) meta: Box<Metadata>,
    pub(crate) payload: Bytes,
    pub(crate) id: EventId,
    pub(crate) correlation_id: EventId,
    /// On an emission of a replayed delivery, its `choreo-replay` value
    /// (also in `headers`), for a retry to write again.
    pub(crate) replay: Option<std::sync::Arc<str>>,
}

impl Outgoing {
    pub(crate) fn new<E: Event>(event: &E, meta: Metadata) -> Result<Self, PublishError> {
        Ok(Self {
            event: E::NAME,
            stream: const {
                &StreamOf {
                    name: E::STREAM,
                    subjects: E::STREAM_SUBJECTS,
                    filter: E::SUBJECT_FILTER,
                }
            },
            subject: event.subject()?,
            headers: meta.to_headers(),
            payload: Bytes::from(crate::wire::codec::encode(event)?),
            id: meta.id(),
            correlation_id: meta.correlation_id(),
            meta: Box::new(meta),
            replay: None,
        })
    }

    /// Size on the wire as NATS counts it against `max_payload`.
    pub(super) fn size(&self) -> usize {
        crate::wire::headers::wire_size(&self.headers, self.payload.len())
    }
}

/// One event encoded as it will be published: its final id, subject,
/// headers and payload. What a transactional outbox stores in a database
/// transaction: a handler's emissions
/// ([`Context::emissions`](crate::Context::emissions)), or a root event
/// ([`Publisher::prepare`](crate::Publisher::prepare)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Emission {
    /// The event's id (`Nats-Msg-Id`): for a handler's emission, the same
    /// on every run of the handler for the event, so a second publish is a
    /// duplicate the stream drops.
    pub event_id: crate::EventId,
    /// The event type's name.
    pub event_type: &'static str,
    /// The stream it goes to.
    pub stream: &'static str,
    /// The subject it is published on.
    pub subject: String,
    /// Its headers (choreo's wire format).
    pub headers: async_nats::HeaderMap,
    /// Its encoded payload.
    pub payload: bytes::Bytes,
}
