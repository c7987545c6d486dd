//! Reading an aggregate's history: batched direct gets on its filter, from a
//! stream sequence on, answered on the connection's long-lived subscription
//! for answers (no consumer is made, so a load costs the server no state,
//! and no subscription of its own).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use time::OffsetDateTime;

use super::error::{AggregateError, AggregateErrorKind};
use super::store::At;
use crate::nats::LazyAnswers;

/// How many events one direct get returns at most.
const BATCH: usize = 256;

/// How long one batch may take to come (it comes in milliseconds; longer is
/// a stream without a leader, or a request the account may not make).
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One stored event, as read.
pub(crate) struct Raw {
    pub(crate) sequence: u64,
    pub(crate) subject: String,
    pub(crate) stored_at: OffsetDateTime,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

/// Where a read stops: after this sequence, or after this time (both
/// inclusive).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Until {
    pub(crate) sequence: Option<u64>,
    pub(crate) time: Option<OffsetDateTime>,
}

impl From<At> for Until {
    fn from(at: At) -> Self {
        match at {
            At::Sequence(s) => Self {
                sequence: Some(s),
                time: None,
            },
            At::Time(t) => Self {
                sequence: None,
                time: Some(t),
            },
        }
    }
}

impl Until {
    fn passed_by(&self, raw: &Raw) -> bool {
        self.sequence.is_some_and(|s| raw.sequence > s)
            || self.time.is_some_and(|t| raw.stored_at > t)
    }
}

/// Reads the events of `filter` in `stream` stored after sequence `after`,
/// up to `until`, calling `each` with every one in order. Returns how many
/// it read.
pub(crate) async fn read(
    (client, answers): (&async_nats::Client, &LazyAnswers),
    (api_prefix, stream): (&str, &str),
    (aggregate, id, filter): (&'static str, &str, &str),
    after: u64,
    until: Until,
    mut each: impl FnMut(Raw) -> Result<(), AggregateError>,
) -> Result<u64, AggregateError> {
    let fail = |kind, detail: String| AggregateError::new(aggregate, id, kind, detail);
    let answers = answers.get(client).await.map_err(|e| {
        fail(
            AggregateErrorKind::Read,
            "cannot subscribe for the answers".into(),
        )
        .with_source(e)
    })?;
    let direct_get = format!("{api_prefix}.DIRECT.GET.{stream}");
    let mut from = after + 1;
    let mut read = 0;
    loop {
        if until.sequence.is_some_and(|up_to| up_to < from) {
            return Ok(read);
        }
        // `until` is applied here, as the events come: the server's
        // `up_to_seq` and `up_to_time` are for `multi_last` reads.
        let request = NextBySubject {
            seq: from,
            next_by_subj: filter,
            batch: BATCH,
        };
        let body = serde_json::to_vec(&request).map_err(|e| {
            fail(AggregateErrorKind::Read, "cannot encode a read".into()).with_source(e)
        })?;
        let (subject, mut reply) = answers.reply();
        client
            .publish_with_reply(direct_get.clone(), subject, body.into())
            .await
            .map_err(|e| {
                fail(AggregateErrorKind::Read, "cannot send a read".into()).with_source(e)
            })?;
        let mut last = None;
        loop {
            let answer = tokio::time::timeout(BATCH_TIMEOUT, reply.next())
                .await
                .map_err(|_| {
                    fail(
                        AggregateErrorKind::Read,
                        format!("no answer from {stream} within {BATCH_TIMEOUT:?} (no leader, or the account may not read it directly)"),
                    )
                })?
                .ok_or_else(|| fail(AggregateErrorKind::Read, "the connection closed during a read".into()))?;
            if let Some(status) = answer.status {
                match status.as_u16() {
                    // End of the batch: more to come only if some are pending.
                    204 => {
                        let pending = answer
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Num-Pending"))
                            .and_then(|v| v.as_str().parse::<u64>().ok())
                            .unwrap_or(0);
                        match last {
                            Some(seq) if pending > 0 => {
                                from = seq + 1;
                                break;
                            }
                            _ => return Ok(read),
                        }
                    }
                    // Nothing (more) on the filter.
                    404 => return Ok(read),
                    503 => {
                        return Err(fail(
                            AggregateErrorKind::Read,
                            format!(
                                "stream {stream} is not available (no responders); does it allow direct gets?"
                            ),
                        ));
                    }
                    code => {
                        return Err(fail(
                            AggregateErrorKind::Read,
                            format!(
                                "reading {stream} failed: {code} {}",
                                answer.description.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                }
            }
            let raw = raw(answer.headers, answer.payload).ok_or_else(|| {
                fail(
                    AggregateErrorKind::Read,
                    format!(
                        "a direct get answer from {stream} lacks its sequence, subject or time"
                    ),
                )
            })?;
            if until.passed_by(&raw) {
                return Ok(read);
            }
            last = Some(raw.sequence);
            read += 1;
            each(raw)?;
        }
    }
}

/// A batched direct get's request: up to `batch` messages on
/// `next_by_subj`, from sequence `seq` on.
#[derive(serde::Serialize)]
struct NextBySubject<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: usize,
}

/// A direct get's answer as a stored event.
fn raw(headers: Option<HeaderMap>, payload: Bytes) -> Option<Raw> {
    let headers = headers?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    let sequence = get("Nats-Sequence")?.parse().ok()?;
    let subject = get("Nats-Subject")?;
    let stored_at = OffsetDateTime::parse(
        &get("Nats-Time-Stamp")?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some(Raw {
        sequence,
        subject,
        stored_at,
        headers,
        payload,
    })
}
