//! Appending a decision's events guarded by each boundary's last sequence:
//! `Nats-Expected-Last-Subject-Sequence` with `-Subject` (the aggregate's
//! filter) on one message per boundary. One event is one publish; several
//! are one atomic batch (nats-server 2.12+, a stream that allows atomic
//! publishes), each boundary's check on a message of its own, since a
//! message carries one check and the server checks every message of a
//! batch before it stores any.

use std::time::Duration;

use async_nats::HeaderMap;
use serde::Deserialize;

use crate::event::EventId;
use crate::publish::Outgoing;

/// The header that carries the last sequence a decision read.
pub(crate) const EXPECTED_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The header that names the filter the check is against.
pub(crate) const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// The header that marks a message of an atomic batch.
pub(crate) const BATCH_ID: &str = "Nats-Batch-Id";

/// The most events one atomic batch may hold (the server's limit).
pub(crate) const MAX_BATCH: usize = 1000;

/// How long an append waits for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How an append ended.
pub(crate) enum Outcome {
    /// Stored: each event's id, subject and sequence, in order.
    Stored(Vec<(EventId, String, u64)>),
    /// Somebody appended to the boundary since the decision read it.
    Conflict,
    /// No answer, or the server says the batch repeats stored ids: the
    /// events may be stored; a load tells.
    Unknown(String),
    /// The stream does not allow atomic batches.
    NoAtomic(String),
    /// Refused for another reason.
    Refused(String),
}

/// A PubAck, or its error.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A boundary's check: the last sequence a decision read on its filter.
#[derive(Clone, Debug)]
pub(crate) struct Check {
    pub(crate) filter: String,
    pub(crate) expected: u64,
}

/// Appends `outs` (already checked for size), each with the check it
/// carries, if every check still holds.
pub(crate) async fn append(
    client: &async_nats::Client,
    outs: Vec<(Outgoing, Option<Check>)>,
) -> Outcome {
    let ids: Vec<(EventId, String)> = outs
        .iter()
        .map(|(o, _)| (o.id, o.subject.clone()))
        .collect();
    let n = outs.len();
    let batch = if n > 1 {
        EventId::new_random().to_string()
    } else {
        String::new()
    };
    let mut answer = None;
    for (i, (mut out, check)) in outs.into_iter().enumerate() {
        let headers = &mut out.headers;
        if let Some(check) = check {
            headers.insert(EXPECTED_SEQUENCE, check.expected.to_string());
            headers.insert(EXPECTED_SUBJECT, check.filter.as_str());
        }
        if n > 1 {
            headers.insert(BATCH_ID, batch.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string());
            if i + 1 == n {
                headers.insert("Nats-Batch-Commit", "1");
            }
        }
        let headers = std::mem::take(&mut out.headers);
        let subject = std::mem::take(&mut out.subject);
        // The first message (the batch's start, answered with an empty
        // reply or its refusal) and the last (the PubAck) are requests;
        // those between are sent as they are.
        let last = i + 1 == n;
        if i == 0 || last {
            match request(client, subject, headers, out.payload).await {
                Ok(a) if last => answer = Some(a),
                Ok(a) if a.error.is_some() => {
                    answer = Some(a);
                    break;
                }
                Ok(_) => {}
                Err(e) => return Outcome::Unknown(e),
            }
        } else if let Err(e) = client
            .publish_with_headers(subject, headers, out.payload)
            .await
        {
            return Outcome::Unknown(e.to_string());
        }
    }
    let Some(answer) = answer else {
        return Outcome::Unknown("no answer".to_owned());
    };
    match answer.error {
        None => {
            let last = answer.seq;
            let first = last + 1 - n as u64;
            if answer.duplicate {
                // A keyed event that exists already: the stored one stands.
                tracing::debug!(sequence = last, "the decision's event was stored before");
            }
            Outcome::Stored(
                ids.into_iter()
                    .enumerate()
                    .map(|(i, (id, subject))| (id, subject, first + i as u64))
                    .collect(),
            )
        }
        // Wrong last sequence; with a write in flight on a cluster, the same
        // without a number.
        Some(e) if e.err_code == 10071 || e.err_code == 10164 => Outcome::Conflict,
        // The batch repeats ids already stored: an earlier try went through.
        Some(e) if e.err_code == 10201 => Outcome::Unknown(e.description),
        Some(e) if e.err_code == 10174 => Outcome::NoAtomic(e.description),
        Some(e) => Outcome::Refused(format!("{} (error {})", e.description, e.err_code)),
    }
}

/// One request, its answer parsed (empty: no error).
async fn request(
    client: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
) -> Result<Answer, String> {
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(payload)
        .timeout(Some(ANSWER_TIMEOUT));
    let reply = client
        .send_request(subject, request)
        .await
        .map_err(|e| e.to_string())?;
    if reply.payload.is_empty() {
        return Ok(Answer {
            seq: 0,
            duplicate: false,
            error: None,
        });
    }
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("an answer that is not a PubAck ({e})"))
}

/// How many conflicts in a row a decision retries without a pause.
pub(super) const IMMEDIATE_RETRIES: u32 = 3;

/// `d` scaled by a factor between 0.5 and 1.5.
pub(super) fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let r = (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + r)
}
