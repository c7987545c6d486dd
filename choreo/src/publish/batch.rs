//! JetStream's atomic batch publish (nats-server 2.12+, a stream with
//! `allow_atomic`): messages marked with one `Nats-Batch-Id` and their
//! sequence in it, the last with `Nats-Batch-Commit`; the server stores all
//! of them or none. The first message is a request (answered empty, or with
//! its refusal), those between are plain publishes, the last is a request
//! answered with the PubAck of the batch.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

use crate::event::EventId;

/// The header that marks a message of an atomic batch.
pub(crate) const BATCH_ID: &str = "Nats-Batch-Id";

/// The most messages one atomic batch may hold (the server's limit).
pub(crate) const MAX_BATCH: usize = 1000;

/// How long a batch waits for the server's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A PubAck, or its error.
#[derive(Deserialize)]
pub(crate) struct Answer {
    #[serde(default)]
    pub(crate) seq: u64,
    #[serde(default)]
    pub(crate) duplicate: bool,
    pub(crate) error: Option<ApiError>,
}

/// The server's refusal.
#[derive(Deserialize)]
pub(crate) struct ApiError {
    #[serde(default)]
    pub(crate) err_code: u64,
    #[serde(default)]
    pub(crate) description: String,
}

/// The error code of a stream that does not take atomic batches.
pub(crate) const NO_ATOMIC: u64 = 10174;

/// Sends `messages` (subject, headers, payload), as one atomic batch when
/// there are several, and returns the server's answer to the last one (or
/// to the first, if it refused the batch). `Err`: no answer came, so the
/// outcome is unknown.
pub(crate) async fn send(
    client: &async_nats::Client,
    messages: Vec<(String, HeaderMap, Bytes)>,
) -> Result<Answer, String> {
    let n = messages.len();
    let batch = if n > 1 {
        EventId::new_random().to_string()
    } else {
        String::new()
    };
    let mut answer = None;
    for (i, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
        if n > 1 {
            headers.insert(BATCH_ID, batch.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string());
            if i + 1 == n {
                headers.insert("Nats-Batch-Commit", "1");
            }
        }
        let last = i + 1 == n;
        if i == 0 || last {
            match request(client, subject, headers, payload).await? {
                a if last => answer = Some(a),
                a if a.error.is_some() => {
                    answer = Some(a);
                    break;
                }
                _ => {}
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    answer.ok_or_else(|| "no answer".to_owned())
}

/// One request, its answer parsed (empty: no error).
async fn request(
    client: &async_nats::Client,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
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

/// How an atomic batch of [`Publisher::publish_atomic`](crate::Publisher::publish_atomic) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchOutcome {
    /// Stored, all of them: their stream sequences, in order.
    Stored(Vec<u64>),
    /// The server or the stream takes no atomic batches (nats-server before
    /// 2.12, or a stream without `allow_atomic`): nothing was stored.
    NotAtomic(String),
    /// Refused (over the server's batch size, events of several streams, a
    /// duplicate): nothing was stored.
    Refused(String),
    /// No answer came: stored or not.
    Unknown(String),
}

impl crate::Publisher {
    /// Publishes `events` (prepared with
    /// [`prepare`](crate::Publisher::prepare), all of one stream) as one
    /// atomic batch: the stream stores all of them, in order, or none
    /// (nats-server 2.12+, a stream with `allow_atomic`; see
    /// [`BatchOutcome::NotAtomic`] for the others). One event is one plain
    /// publish.
    pub async fn publish_atomic(&self, events: Vec<super::Emission>) -> BatchOutcome {
        let n = events.len();
        if n == 0 {
            return BatchOutcome::Stored(Vec::new());
        }
        if n > MAX_BATCH {
            return BatchOutcome::Refused(format!(
                "{n} events; an atomic batch holds at most {MAX_BATCH}"
            ));
        }
        if let Some(other) = events.iter().find(|e| e.stream != events[0].stream) {
            return BatchOutcome::Refused(format!(
                "events of streams {} and {}: an atomic batch is one stream's",
                events[0].stream, other.stream
            ));
        }
        let messages = events
            .into_iter()
            .map(|e| (e.subject, e.headers, e.payload))
            .collect();
        let answer = match send(self.client(), messages).await {
            Ok(a) => a,
            Err(e) => return BatchOutcome::Unknown(e),
        };
        match answer.error {
            None => {
                let first = answer.seq + 1 - n as u64;
                BatchOutcome::Stored((0..n as u64).map(|i| first + i).collect())
            }
            Some(e) if e.err_code == NO_ATOMIC => BatchOutcome::NotAtomic(e.description),
            Some(e) => BatchOutcome::Refused(format!("{} (error {})", e.description, e.err_code)),
        }
    }
}
