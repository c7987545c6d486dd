//! The dead-letter stream.
//!
//! An event a handler cannot handle is never dropped: the original message
//! (subject, headers and payload) is copied to stream [`DLQ_STREAM`] on subject
//! `choreo.dlq.<service>.<handler>`, with `choreo-dlq-*` headers that say why,
//! and only then terminated on its consumer (`+TERM <reason>`). The stream
//! uses limits retention, so dead letters stay for inspection and replay.
//!
//! A last delivery lost without a verdict (the process crashed, or `ack_wait`
//! ran out) is reported by JetStream's `MAX_DELIVERIES` advisory. choreo keeps
//! those advisories in stream [`ADVISORY_STREAM`], so they are not lost while
//! no instance runs, and each handler's advisory consumer dead-letters the
//! message they name.

use async_nats::HeaderMap;

mod read;
mod work;

pub use crate::topology::{ADVISORY_STREAM, DLQ_STREAM, DLQ_SUBJECTS, dlq_subject as subject};
pub use read::{DeadLetter, DlqError, DlqErrorKind, list, replay};
pub use work::{
    Filter, SummaryLine, letter, letters, payload_from_json, payload_to_json, purge,
    replay_corrected, summary,
};

/// Header: why the event was dead-lettered (a [`Reason`] code).
pub const REASON: &str = "choreo-dlq-reason";
/// Header: the error message, on one line.
pub const DETAIL: &str = "choreo-dlq-detail";
/// Header: the service.
pub const SERVICE: &str = "choreo-dlq-service";
/// Header: the handler.
pub const HANDLER: &str = "choreo-dlq-handler";
/// Header: how many times the event was delivered.
pub const DELIVERIES: &str = "choreo-dlq-deliveries";
/// Header: the original stream.
pub const STREAM: &str = "choreo-dlq-stream";
/// Header: the original stream sequence.
pub const SEQUENCE: &str = "choreo-dlq-sequence";
/// Header: the original subject.
pub const SUBJECT: &str = "choreo-dlq-subject";

/// Why an event was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A header is missing or malformed.
    BadHeader,
    /// `ce-type` names another event than the handler's.
    WrongType,
    /// `ce-eventversion` is not one this build reads.
    UnknownVersion,
    /// The payload is not the event in CBOR.
    UndecodablePayload,
    /// The handler returned a permanent error.
    PermanentError,
    /// The handler failed (or panicked) on its last allowed delivery.
    MaxDeliverExceeded,
    /// The last allowed delivery ended without a verdict (crash, ack timeout).
    DeliveryLost,
    /// The handler ran past its `timeout` on its last allowed delivery.
    Timeout,
    /// An event the handler emitted could not be built (bad subject value,
    /// encoding error, too large).
    EmitFailed,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 9] = [
        Self::BadHeader,
        Self::WrongType,
        Self::UnknownVersion,
        Self::UndecodablePayload,
        Self::PermanentError,
        Self::MaxDeliverExceeded,
        Self::DeliveryLost,
        Self::Timeout,
        Self::EmitFailed,
    ];

    /// The code written in [`REASON`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadHeader => "bad-header",
            Self::WrongType => "wrong-type",
            Self::UnknownVersion => "unknown-version",
            Self::UndecodablePayload => "undecodable-payload",
            Self::PermanentError => "permanent-error",
            Self::MaxDeliverExceeded => "max-deliver-exceeded",
            Self::DeliveryLost => "delivery-lost",
            Self::Timeout => "timeout",
            Self::EmitFailed => "emit-failed",
        }
    }

    pub(crate) fn from_decode(e: &crate::DecodeError) -> Self {
        match e {
            crate::DecodeError::Header(_) => Self::BadHeader,
            crate::DecodeError::WrongType { .. } => Self::WrongType,
            crate::DecodeError::UnknownVersion { .. } => Self::UnknownVersion,
            _ => Self::UndecodablePayload,
        }
    }
}

/// Where a dead letter came from and why.
#[derive(Clone, Debug)]
pub(crate) struct Letter<'a> {
    pub(crate) service: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) reason: Reason,
    pub(crate) detail: String,
    pub(crate) deliveries: u64,
    pub(crate) stream: &'a str,
    pub(crate) sequence: u64,
    pub(crate) subject: &'a str,
}

/// Header: present when the letter holds only a reference to the event (its
/// stream and sequence), because the copy would have exceeded the server's
/// `max_payload`; says what was left out.
pub const OMITTED: &str = "choreo-dlq-omitted";

impl Letter<'_> {
    /// The dead letter: the original headers (less JetStream's own) and
    /// payload, plus the reason headers, with a `Nats-Msg-Id` unique to
    /// (stream, sequence, handler) so that a retried or doubled
    /// dead-lettering stores one copy. A copy that would exceed
    /// `max_payload` keeps only the reason headers and the event's identity
    /// (its stream and sequence, its `ce-id` and `ce-type`), with
    /// [`OMITTED`] saying so: dead-lettering never fails for size.
    pub(crate) fn message(
        &self,
        original: Option<&HeaderMap>,
        payload: bytes::Bytes,
        max_payload: usize,
    ) -> (HeaderMap, bytes::Bytes) {
        // The original store is named by the `choreo-dlq-stream` and
        // `choreo-dlq-sequence` headers instead of JetStream's own.
        let mut h = original.map_or_else(HeaderMap::new, crate::wire::headers::without_jetstream);
        self.add_reason(&mut h);
        if crate::wire::headers::wire_size(&h, payload.len()) <= max_payload {
            return (h, payload);
        }
        let mut small = HeaderMap::new();
        for name in [crate::wire::headers::CE_ID, crate::wire::headers::CE_TYPE] {
            if let Some(v) = original
                .and_then(|o| o.get(name))
                .filter(|v| v.as_str().len() <= 256)
            {
                small.insert(name, v.as_str());
            }
        }
        self.add_reason(&mut small);
        small.insert(
            OMITTED,
            format!(
                "the payload ({} bytes) and headers: the copy would exceed max_payload ({max_payload} bytes); \
                 read the event from stream {} at sequence {}",
                payload.len(),
                self.stream,
                self.sequence
            ),
        );
        (small, bytes::Bytes::new())
    }

    fn add_reason(&self, h: &mut HeaderMap) {
        h.insert(
            crate::wire::headers::NATS_MSG_ID,
            format!(
                "dlq:{}:{}:{}.{}",
                self.stream, self.sequence, self.service, self.handler
            ),
        );
        h.insert(REASON, self.reason.as_str());
        h.insert(DETAIL, one_line(&self.detail));
        h.insert(SERVICE, self.service);
        h.insert(HANDLER, self.handler);
        h.insert(DELIVERIES, self.deliveries.to_string());
        h.insert(STREAM, self.stream);
        h.insert(SEQUENCE, self.sequence.to_string());
        h.insert(SUBJECT, one_line(self.subject));
    }
}

/// A header-safe, bounded version of an error message.
pub(crate) fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 1024 {
        let mut end = 1024;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// The part of a `MAX_DELIVERIES` advisory that choreo reads.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct MaxDeliveries {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) stream_seq: u64,
    pub(crate) deliveries: u64,
}
