//! Reading dead letters back, and replaying them.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};

use crate::nats::{Cause, Source, source};
use crate::topology::{ADVISORY_STREAM, DLQ_STREAM, dlq_subject};

use super::{
    DELIVERIES, DETAIL, HANDLER, OMITTED, REASON, Reason, SEQUENCE, SERVICE, STREAM, SUBJECT,
};

/// A dead letter read back from [`DLQ_STREAM`].
#[derive(Clone)]
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
    /// When the letter was written (the dead-letter stream's time).
    pub dead_lettered_at: Option<time::OffsetDateTime>,
}

impl DeadLetter {
    /// The event's type (`ce-type`), or empty.
    pub fn event_type(&self) -> &str {
        self.headers
            .get(crate::wire::headers::CE_TYPE)
            .map_or("", |v| v.as_str())
    }

    /// The event's id (`ce-id`), or empty.
    pub fn event_id(&self) -> &str {
        self.headers
            .get(crate::wire::headers::CE_ID)
            .map_or("", |v| v.as_str())
    }

    /// The [`Reason`], read back from its code (`None` for a code this
    /// version does not know).
    pub fn reason_code(&self) -> Option<Reason> {
        self.reason.parse().ok()
    }
}

/// One line with what a person looks for first, then the payload's size
/// rather than its bytes; `{:#?}` adds the headers.
impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dead letter {} of {}.{}: {} after {} deliveries ({}); event {} {} on {} (stream {} #{}), {} payload bytes{}",
            self.sequence,
            self.service,
            self.handler,
            self.reason,
            self.deliveries,
            self.detail,
            self.event_type(),
            self.event_id(),
            self.original_subject,
            self.original_stream,
            self.original_sequence,
            self.payload.len(),
            if self.omitted.is_some() {
                " (omitted: only a reference)"
            } else {
                ""
            },
        )?;
        if f.alternate() {
            for (name, values) in self.headers.iter() {
                for v in values {
                    write!(f, "\n  {}: {}", name.as_ref() as &str, v.as_str())?;
                }
            }
        }
        Ok(())
    }
}

/// Reading or replaying dead letters failed.
#[derive(thiserror::Error)]
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
    /// No letter at that sequence (replayed, purged, or never written).
    #[error(
        "no dead letter at sequence {sequence} of {DLQ_STREAM} (replayed, purged, or never written)"
    )]
    NoLetter {
        /// The sequence asked for.
        sequence: u64,
    },
    /// A letter cannot be replayed as it is.
    #[error("dead letter {sequence} cannot be replayed: {why}")]
    NotReplayable {
        /// The letter's sequence in the dead-letter stream.
        sequence: u64,
        /// Why.
        why: String,
    },
    /// The server refused or did not answer.
    #[error("dead-letter stream: {source}")]
    Nats {
        /// What the server or client said.
        #[source]
        source: Source,
    },
}

/// What kind of [`DlqError`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DlqErrorKind {
    /// [`DlqError::NoStream`].
    NoStream,
    /// [`DlqError::UnknownHandler`].
    UnknownHandler,
    /// [`DlqError::NoLetter`].
    NoLetter,
    /// [`DlqError::NotReplayable`].
    NotReplayable,
    /// [`DlqError::Nats`].
    Nats,
}

impl DlqError {
    /// What kind of failure this is.
    pub fn kind(&self) -> DlqErrorKind {
        match self {
            Self::NoStream => DlqErrorKind::NoStream,
            Self::UnknownHandler { .. } => DlqErrorKind::UnknownHandler,
            Self::NoLetter { .. } => DlqErrorKind::NoLetter,
            Self::NotReplayable { .. } => DlqErrorKind::NotReplayable,
            Self::Nats { .. } => DlqErrorKind::Nats,
        }
    }
}

crate::debug_as_display!(DlqError);

/// A [`DlqError::Nats`] from any error.
pub(super) fn nats(e: impl std::error::Error + Send + Sync + 'static) -> DlqError {
    DlqError::Nats { source: source(e) }
}

/// How long [`list`] waits for the next letter before it takes the rest as
/// gone (replayed, purged or expired while it read).
const LIST_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) fn letter_from(
    sequence: u64,
    all: &HeaderMap,
    payload: bytes::Bytes,
    at: Option<time::OffsetDateTime>,
) -> DeadLetter {
    let get = |name: &str| {
        all.get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let mut headers = HeaderMap::new();
    for (name, values) in all.iter() {
        let n: &str = name.as_ref();
        if n.starts_with("choreo-dlq-") || n == crate::wire::headers::NATS_MSG_ID {
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
        dead_lettered_at: at,
    }
}

/// The dead-letter stream, or [`DlqError::NoStream`].
pub(super) async fn dlq_stream(
    js: &jetstream::Context,
) -> Result<jetstream::stream::Stream, DlqError> {
    match js.get_stream(DLQ_STREAM).await {
        Ok(s) => Ok(s),
        Err(e) if Cause::of(&e) == Cause::Code(jetstream::ErrorCode::STREAM_NOT_FOUND) => {
            Err(DlqError::NoStream)
        }
        Err(e) => Err(nats(e)),
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
    js: &jetstream::Context,
    service: &str,
    handler: &str,
) -> Result<Vec<DeadLetter>, DlqError> {
    let _ = dlq_stream(js).await?;
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
    read_letters(js, dlq_subject(service, handler)).await
}

/// Every letter on `filter` (a subject of the dead-letter stream), oldest
/// first, up to the last one present when it starts.
pub(super) async fn read_letters(
    js: &jetstream::Context,
    filter: String,
) -> Result<Vec<DeadLetter>, DlqError> {
    use futures::StreamExt;
    let stream = dlq_stream(js).await?;
    let last = match stream.get_last_raw_message_by_subject(&filter).await {
        Ok(m) => m.sequence,
        // No letter for this handler.
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(Vec::new());
        }
        // Anything else (a denied or timed-out read) is not "no letters".
        Err(e) => return Err(nats(e)),
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
        let info = msg
            .info()
            .map_err(|e| DlqError::Nats { source: e.into() })?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let empty = HeaderMap::new();
        out.push(letter_from(
            sequence,
            msg.headers.as_ref().unwrap_or(&empty),
            msg.payload.clone(),
            Some(info.published),
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
pub async fn replay(js: &jetstream::Context, letter: &DeadLetter) -> Result<(), DlqError> {
    replay_payload(js, letter, None).await
}

/// [`replay`], with `corrected` in place of the letter's payload.
pub(super) async fn replay_payload(
    js: &jetstream::Context,
    letter: &DeadLetter,
    corrected: Option<bytes::Bytes>,
) -> Result<(), DlqError> {
    if letter.original_subject.is_empty() {
        return Err(DlqError::NotReplayable {
            sequence: letter.sequence,
            why: "it has no original subject to replay to".into(),
        });
    }
    let (mut headers, payload) = if letter.omitted.is_some() && corrected.is_none() {
        let original = js
            .get_stream(&letter.original_stream)
            .await
            .map_err(nats)?
            .get_raw_message(letter.original_sequence)
            .await
            .map_err(|e| DlqError::NotReplayable {
                sequence: letter.sequence,
                why: format!(
                    "it keeps only a reference, and stream {} no longer has sequence {}: {e}",
                    letter.original_stream, letter.original_sequence
                ),
            })?;
        (
            crate::wire::headers::without_jetstream(&original.headers),
            original.payload,
        )
    } else {
        (letter.headers.clone(), letter.payload.clone())
    };
    let payload = corrected.unwrap_or(payload);
    let id = headers
        .get(crate::wire::headers::CE_ID)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    headers.insert(
        crate::wire::headers::NATS_MSG_ID,
        format!("replay:{id}:{}", letter.sequence),
    );
    // Which letter, and whose: `choreo trace` shows the copy as that
    // handler's replay, the original as dead-lettered then replayed.
    headers.insert(
        crate::wire::headers::CHOREO_REPLAY,
        format!(
            "dlq {} {}.{}",
            letter.sequence, letter.service, letter.handler
        ),
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
