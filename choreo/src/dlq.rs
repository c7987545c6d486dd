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
use async_nats::jetstream::{self, consumer::pull};

use crate::error::StreamError;
use crate::publish::{StreamSettings, ensure_stream};

/// The dead-letter stream's name.
pub const DLQ_STREAM: &str = "CHOREO_DLQ";
/// The dead-letter stream's subjects.
pub const DLQ_SUBJECTS: &str = "choreo.dlq.>";
/// The stream that keeps `MAX_DELIVERIES` advisories.
pub const ADVISORY_STREAM: &str = "CHOREO_ADVISORIES";
/// The advisories it keeps.
pub const ADVISORY_SUBJECTS: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";

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

/// The subject of a handler's dead letters.
pub fn subject(service: &str, handler: &str) -> String {
    format!("choreo.dlq.{service}.{handler}")
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

/// Whether a header of the original message is kept in its dead letter.
/// JetStream's own headers are dropped: control headers
/// (`Nats-Expected-*`, `Nats-Rollup`, `Nats-TTL`, `Nats-Schedule*`,
/// `Nats-Batch-*`, …) would make the dead-letter stream refuse the copy or
/// act on it, and the rest describe the original store, which the
/// `choreo-dlq-stream` and `choreo-dlq-sequence` headers name.
fn kept(name: &str) -> bool {
    !name
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
}

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
        let mut h = HeaderMap::new();
        if let Some(orig) = original {
            for (name, values) in orig.iter() {
                if !kept(name.as_ref()) {
                    continue;
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
        }
        self.add_reason(&mut h);
        if crate::headers::wire_size(&h, payload.len()) <= max_payload {
            return (h, payload);
        }
        let mut small = HeaderMap::new();
        for name in [crate::headers::CE_ID, crate::headers::CE_TYPE] {
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
            crate::headers::NATS_MSG_ID,
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

/// Creates the dead-letter and advisory streams if missing.
pub(crate) async fn ensure_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), StreamError> {
    ensure_stream(
        js,
        settings,
        DLQ_STREAM,
        vec![DLQ_SUBJECTS.to_owned()],
        "choreo.dlq.x.y",
    )
    .await?;
    // Advisories are kept a week: long enough for a stopped service to start
    // again and dead-letter what they name.
    let advisory = settings
        .clone()
        .max_age(std::time::Duration::from_secs(7 * 24 * 3600));
    ensure_stream(
        js,
        &advisory,
        ADVISORY_STREAM,
        vec![ADVISORY_SUBJECTS.to_owned()],
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.x.y",
    )
    .await
}

/// The advisory consumer of one handler's durable.
pub(crate) fn advisory_consumer(stream: &str, durable: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(format!("{durable}--lost")),
        description: Some(format!(
            "choreo: dead-letters events lost on their last delivery to {durable}"
        )),
        filter_subject: format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_deliver: 100,
        ..Default::default()
    }
}

/// The part of a `MAX_DELIVERIES` advisory that choreo reads.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct MaxDeliveries {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    pub(crate) stream_seq: u64,
    pub(crate) deliveries: u64,
}

// ---- reading and replaying -----------------------------------------------------

/// A dead letter read back from [`DLQ_STREAM`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream.
    pub sequence: u64,
    /// The service whose handler gave up on it.
    pub service: String,
    /// That handler.
    pub handler: String,
    /// The [`Reason`] code.
    pub reason: String,
    /// The error message.
    pub detail: String,
    /// Deliveries before it was dead-lettered.
    pub deliveries: u64,
    /// The subject it was published on.
    pub original_subject: String,
    /// Its original headers (without the `choreo-dlq-*` ones).
    pub headers: HeaderMap,
    /// Its original payload (empty when [`omitted`](Self::omitted)).
    pub payload: bytes::Bytes,
    /// The original stream and its sequence there.
    pub original_stream: String,
    /// The event's sequence in [`original_stream`](Self::original_stream).
    pub original_sequence: u64,
    /// Set when the letter keeps only a reference to the event because a
    /// full copy would have exceeded `max_payload` (the [`OMITTED`]
    /// header); [`replay`] then reads the event from its stream.
    pub omitted: Option<String>,
}

/// Reading or replaying dead letters failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// The server has no dead-letter stream: no choreo service has started
    /// there (in this account and JetStream domain).
    #[error(
        "no dead-letter stream {DLQ_STREAM} on this server: no choreo service has started here \
         (check the server URL, the account and the JetStream domain)"
    )]
    NoStream,
    /// No handler of that name has started in that service.
    #[error(
        "service {service} has no handler {handler} that ever started on this server \
         (no consumer {ADVISORY_STREAM} > {service}--{handler}--lost); check both names"
    )]
    UnknownHandler {
        /// The service asked for.
        service: String,
        /// The handler asked for.
        handler: String,
    },
    /// The server refused or did not answer.
    #[error("dead-letter stream: {0}")]
    Nats(String),
}

/// A [`DlqError::Nats`] from any error.
fn nats(e: impl std::fmt::Display) -> DlqError {
    DlqError::Nats(e.to_string())
}

/// How long [`list`] waits for the next letter before it takes the rest as
/// gone (replayed, purged or expired while it read).
const LIST_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

fn letter_from(sequence: u64, all: &HeaderMap, payload: bytes::Bytes) -> DeadLetter {
    let get = |name: &str| {
        all.get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let mut headers = HeaderMap::new();
    for (name, values) in all.iter() {
        let n: &str = name.as_ref();
        if n.starts_with("choreo-dlq-") || n == crate::headers::NATS_MSG_ID {
            continue;
        }
        for v in values {
            headers.append(name.clone(), v.clone());
        }
    }
    DeadLetter {
        sequence,
        service: get(SERVICE),
        handler: get(HANDLER),
        reason: get(REASON),
        detail: get(DETAIL),
        deliveries: get(DELIVERIES).parse().unwrap_or(0),
        original_subject: get(SUBJECT),
        headers,
        payload,
        original_stream: get(STREAM),
        original_sequence: get(SEQUENCE).parse().unwrap_or(0),
        omitted: all.get(OMITTED).map(|v| v.as_str().to_owned()),
    }
}

/// Every dead letter of handler `handler` of service `service`, oldest first.
///
/// Bounded: it reads up to the last letter present when it starts, and
/// takes letters that vanish while it reads (replayed, purged, expired) as
/// gone rather than waiting for them.
///
/// # Errors
/// [`DlqError::NoStream`] on a server where no choreo service has started;
/// [`DlqError::UnknownHandler`] for a service or handler that never
/// started there; [`DlqError::Nats`] when the stream cannot be read.
pub async fn list(
    client: &async_nats::Client,
    service: &str,
    handler: &str,
) -> Result<Vec<DeadLetter>, DlqError> {
    use futures::StreamExt;
    let js = jetstream::new(client.clone());
    let not_found = |e: &jetstream::context::GetStreamError| {
        matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
    };
    let stream = match js.get_stream(DLQ_STREAM).await {
        Ok(s) => s,
        Err(e) if not_found(&e) => return Err(DlqError::NoStream),
        Err(e) => return Err(nats(e)),
    };
    // Every handler that ever started has its lost-delivery consumer.
    let known = js
        .get_consumer_from_stream::<pull::Config, _, _>(
            format!("{service}--{handler}--lost"),
            ADVISORY_STREAM,
        )
        .await;
    if known.is_err() {
        return Err(DlqError::UnknownHandler {
            service: service.to_owned(),
            handler: handler.to_owned(),
        });
    }
    let filter = subject(service, handler);
    let last = match stream.get_last_raw_message_by_subject(&filter).await {
        Ok(m) => m.sequence,
        // No letter for this handler.
        Err(_) => return Ok(Vec::new()),
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    let mut out = Vec::new();
    loop {
        let Ok(next) = tokio::time::timeout(LIST_IDLE, messages.next()).await else {
            tracing::debug!(
                read = out.len(),
                "no more dead letters arrived; the rest are gone"
            );
            break;
        };
        let Some(next) = next else { break };
        let msg = next.map_err(nats)?;
        let info = msg.info().map_err(nats)?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let empty = HeaderMap::new();
        out.push(letter_from(
            sequence,
            msg.headers.as_ref().unwrap_or(&empty),
            msg.payload.clone(),
        ));
        if pending == 0 || sequence >= last {
            break;
        }
    }
    Ok(out)
}

/// Publishes a dead letter again on its original subject, with its original
/// headers — so every handler sees the same event id, and those that already
/// handled it skip it through their inbox — then deletes it from the
/// dead-letter stream. Its `Nats-Msg-Id` is `replay:<event id>:<dead-letter
/// sequence>`, so JetStream's duplicate window does not drop the replay.
/// Replay after fixing what made the handler give up.
///
/// # Errors
/// The publish or the delete failed; a failed publish leaves the letter in place.
pub async fn replay(client: &async_nats::Client, letter: &DeadLetter) -> Result<(), DlqError> {
    if letter.original_subject.is_empty() {
        return Err(DlqError::Nats(format!(
            "dead letter {} has no original subject to replay to",
            letter.sequence
        )));
    }
    let js = jetstream::new(client.clone());
    let (mut headers, payload) = if letter.omitted.is_some() {
        let original = js
            .get_stream(&letter.original_stream)
            .await
            .map_err(nats)?
            .get_raw_message(letter.original_sequence)
            .await
            .map_err(|e| {
                DlqError::Nats(format!(
                    "dead letter {} keeps only a reference, and stream {} no longer has sequence {}: {e}",
                    letter.sequence, letter.original_stream, letter.original_sequence
                ))
            })?;
        let mut headers = HeaderMap::new();
        for (name, values) in original.headers.iter() {
            if kept(name.as_ref()) {
                for v in values {
                    headers.append(name.clone(), v.clone());
                }
            }
        }
        (headers, original.payload)
    } else {
        (letter.headers.clone(), letter.payload.clone())
    };
    let id = headers
        .get(crate::headers::CE_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    headers.insert(
        crate::headers::NATS_MSG_ID,
        format!("replay:{id}:{}", letter.sequence),
    );
    js.publish_with_headers(letter.original_subject.clone(), headers, payload)
        .await
        .map_err(nats)?
        .await
        .map_err(nats)?;
    let stream = js.get_stream(DLQ_STREAM).await.map_err(nats)?;
    stream.delete_message(letter.sequence).await.map_err(nats)?;
    Ok(())
}
