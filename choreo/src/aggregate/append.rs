//! Appending a decision's events guarded by each boundary's last sequence:
//! `Nats-Expected-Last-Subject-Sequence` with `-Subject` (the aggregate's
//! filter) on one message per boundary. One event is one publish; several
//! are one atomic batch (nats-server 2.12+, a stream that allows atomic
//! publishes), each boundary's check on a message of its own, since a
//! message carries one check and the server checks every message of a
//! batch before it stores any.

use crate::event::EventId;
use crate::nats::moved_on_code;
use crate::publish::{Outgoing, batch};

/// The header that carries the last sequence a decision read.
pub(crate) const EXPECTED_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The header that names the filter the check is against.
pub(crate) const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
pub(crate) use crate::publish::batch::{BATCH_ID, MAX_BATCH};

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
    let messages = outs
        .into_iter()
        .map(|(mut out, check)| {
            if let Some(check) = check {
                out.headers
                    .insert(EXPECTED_SEQUENCE, check.expected.to_string());
                out.headers.insert(EXPECTED_SUBJECT, check.filter.as_str());
            }
            (out.subject, out.headers, out.payload)
        })
        .collect();
    let answer = match batch::send(client, messages).await {
        Ok(a) => a,
        Err(e) => return Outcome::Unknown(e),
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
        Some(e) if moved_on_code(async_nats::jetstream::ErrorCode(e.err_code)) => Outcome::Conflict,
        // The batch repeats ids already stored: an earlier try went through.
        Some(e) if e.err_code == 10201 => Outcome::Unknown(e.description),
        Some(e) if e.err_code == batch::NO_ATOMIC => Outcome::NoAtomic(e.description),
        Some(e) => Outcome::Refused(format!("{} (error {})", e.description, e.err_code)),
    }
}

/// How many conflicts in a row a decision retries without a pause.
pub(super) const IMMEDIATE_RETRIES: u32 = 3;
