//! The dead-letter workbench: every letter or a filtered few, one by its
//! sequence, a summary by reason, replay with a corrected payload, purge.
//! What `choreo dlq` runs.

use std::collections::BTreeMap;

use async_nats::jetstream;
use serde::Serialize;

use super::Reason;
use super::read::{DeadLetter, DlqError, nats, read_letters, replay_payload};

impl std::str::FromStr for Reason {
    type Err = String;

    /// Reads a [`Reason`] code back (`permanent-error`, ...), as
    /// [`as_str`](Reason::as_str) writes it.
    fn from_str(s: &str) -> Result<Self, String> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
                format!(
                    "{s:?} is not a dead-letter reason; the reasons are {}",
                    codes.join(", ")
                )
            })
    }
}

/// Which letters to take: every field set narrows the choice.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Filter {
    /// Only this service's letters.
    pub service: Option<String>,
    /// Only this handler's (with `service`).
    pub handler: Option<String>,
    /// Only letters with this reason.
    pub reason: Option<Reason>,
    /// Only letters of this event type (`ce-type`).
    pub event_type: Option<String>,
    /// Only letters written at or after this time.
    pub since: Option<time::OffsetDateTime>,
    /// Only letters written before this time.
    pub until: Option<time::OffsetDateTime>,
}

impl Filter {
    /// Every letter.
    pub fn all() -> Self {
        Self::default()
    }

    /// The subjects to read: one handler's, one service's, or all.
    fn subject(&self) -> String {
        match (&self.service, &self.handler) {
            (Some(s), Some(h)) => super::subject(s, h),
            (Some(s), None) => format!("choreo.dlq.{s}.>"),
            _ => super::DLQ_SUBJECTS.to_owned(),
        }
    }

    fn keeps(&self, l: &DeadLetter) -> bool {
        self.reason.is_none_or(|r| l.reason == r.as_str())
            && self
                .event_type
                .as_deref()
                .is_none_or(|t| l.event_type() == t)
            && self
                .since
                .is_none_or(|t| l.dead_lettered_at.is_some_and(|at| at >= t))
            && self
                .until
                .is_none_or(|t| l.dead_lettered_at.is_some_and(|at| at < t))
    }
}

/// The letters `filter` takes, oldest first. Bounded like
/// [`list`](super::list): it reads up to the last letter present when it
/// starts.
///
/// # Errors
/// [`DlqError::NoStream`] where no choreo service has started;
/// [`DlqError::Nats`] when the stream cannot be read.
pub async fn letters(
    js: &jetstream::Context,
    filter: &Filter,
) -> Result<Vec<DeadLetter>, DlqError> {
    let all = read_letters(js, filter.subject()).await?;
    Ok(all.into_iter().filter(|l| filter.keeps(l)).collect())
}

/// The letter at `sequence` of the dead-letter stream.
///
/// # Errors
/// [`DlqError::NoLetter`] when there is none there (replayed, purged, or
/// never written).
pub async fn letter(js: &jetstream::Context, sequence: u64) -> Result<DeadLetter, DlqError> {
    let stream = super::read::dlq_stream(js).await?;
    match stream.get_raw_message(sequence).await {
        Ok(m) => Ok(super::read::letter_from(
            m.sequence,
            &m.headers,
            m.payload,
            Some(m.time),
        )),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Err(DlqError::NoLetter { sequence })
        }
        Err(e) => Err(nats(e)),
    }
}

/// One line of [`summary`]: how many letters one handler has for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SummaryLine {
    /// The service.
    pub service: String,
    /// The handler.
    pub handler: String,
    /// The reason code.
    pub reason: String,
    /// How many letters.
    pub count: usize,
    /// The oldest letter's sequence.
    pub first_sequence: u64,
    /// The newest letter's sequence.
    pub last_sequence: u64,
    /// When the oldest letter was written, Unix ms (0 if unknown).
    pub first_at_ms: u64,
    /// When the newest letter was written, Unix ms (0 if unknown).
    pub last_at_ms: u64,
}

/// The letters grouped by handler and reason, sorted.
pub fn summary(letters: &[DeadLetter]) -> Vec<SummaryLine> {
    let mut groups: BTreeMap<(&str, &str, &str), SummaryLine> = BTreeMap::new();
    for l in letters {
        let line = groups
            .entry((&l.service, &l.handler, &l.reason))
            .or_insert_with(|| SummaryLine {
                service: l.service.clone(),
                handler: l.handler.clone(),
                reason: l.reason.clone(),
                count: 0,
                first_sequence: l.sequence,
                last_sequence: l.sequence,
                first_at_ms: u64::MAX,
                last_at_ms: 0,
            });
        line.count += 1;
        line.first_sequence = line.first_sequence.min(l.sequence);
        line.last_sequence = line.last_sequence.max(l.sequence);
        if let Some(at) = l.dead_lettered_at {
            let ms = u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            line.first_at_ms = line.first_at_ms.min(ms);
            line.last_at_ms = line.last_at_ms.max(ms);
        }
    }
    for line in groups.values_mut() {
        if line.first_at_ms == u64::MAX {
            line.first_at_ms = 0;
        }
    }
    groups.into_values().collect()
}

/// Replays `letter` with `payload` in place of its own: a corrected event,
/// with its id, headers and subject unchanged. Build the payload from JSON
/// with [`payload_from_json`]; the handler decides whether it is valid.
///
/// # Errors
/// As [`replay`](super::replay).
pub async fn replay_corrected(
    js: &jetstream::Context,
    letter: &DeadLetter,
    payload: bytes::Bytes,
) -> Result<(), DlqError> {
    replay_payload(js, letter, Some(payload)).await
}

/// Deletes `letters` from the dead-letter stream; returns how many it
/// deleted (a letter already gone is not counted).
///
/// # Errors
/// The stream cannot be read or a delete is refused.
pub async fn purge(js: &jetstream::Context, letters: &[DeadLetter]) -> Result<usize, DlqError> {
    let stream = super::read::dlq_stream(js).await?;
    let mut deleted = 0;
    for l in letters {
        match stream.delete_message(l.sequence).await {
            Ok(true) => deleted += 1,
            Ok(false) => {}
            Err(e)
                if crate::nats::Cause::of(&e)
                    == crate::nats::Cause::Code(jetstream::ErrorCode::SEQUENCE_NOT_FOUND) => {}
            Err(e) => return Err(nats(e)),
        }
    }
    Ok(deleted)
}

/// A CBOR payload from JSON (an object for a struct), as `choreo` sends
/// events.
///
/// # Errors
/// The text is not JSON.
pub fn payload_from_json(json: &str) -> Result<bytes::Bytes, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let mut out = Vec::new();
    ciborium::into_writer(&value, &mut out).map_err(|e| format!("cannot write it as CBOR: {e}"))?;
    Ok(out.into())
}

/// A CBOR payload as JSON: byte strings become arrays of numbers, and map
/// keys that are not text are written as text.
///
/// # Errors
/// The bytes are not CBOR.
pub fn payload_to_json(payload: &[u8]) -> Result<serde_json::Value, String> {
    let value: ciborium::Value =
        ciborium::from_reader(payload).map_err(|e| format!("the payload is not CBOR: {e}"))?;
    Ok(to_json(value))
}

fn to_json(v: ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::Value as J;
    match v {
        C::Integer(i) => {
            let i = i128::from(i);
            i64::try_from(i).map_or_else(|_| J::String(i.to_string()), |n| J::Number(n.into()))
        }
        C::Bytes(b) => J::Array(b.into_iter().map(|x| J::Number(x.into())).collect()),
        C::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        C::Text(s) => J::String(s),
        C::Bool(b) => J::Bool(b),
        C::Null => J::Null,
        C::Tag(_, inner) => to_json(*inner),
        C::Array(a) => J::Array(a.into_iter().map(to_json).collect()),
        C::Map(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        C::Text(s) => s,
                        other => to_json(other).to_string(),
                    };
                    (k, to_json(v))
                })
                .collect(),
        ),
        _ => J::Null,
    }
}
