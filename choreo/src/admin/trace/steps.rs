//! Each handler's state for one event of a flow ([`step_of`]), and how a
//! replayed dead letter's copy is told from its original ([`of_copy`]).
//!
//! `choreo dlq replay` publishes the letter again on its subject with the
//! same event id and `choreo-replay: dlq <letter> <service>.<handler>`.
//! The original then reads "dead-lettered, then replayed" for the handler
//! that gave up on it, and the copy carries that handler's real state;
//! the other handlers took the original, and skip the copy.

use async_nats::jetstream::{self, consumer};

use super::{Read, Seen, Step, get};
use crate::wire::headers as h;

/// A dead letter's replayed copy, as its `choreo-replay` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DlqCopy {
    /// The letter's sequence in the dead-letter stream.
    pub(super) letter: u64,
    /// The handler that dead-lettered it (`<service>.<handler>`); copies
    /// replayed before choreo wrote it do not say.
    pub(super) handler: Option<String>,
}

impl DlqCopy {
    /// The copy these headers describe, if they are a dead letter's replay.
    pub(super) fn of(headers: &async_nats::HeaderMap) -> Option<Self> {
        let v = get(headers, h::CHOREO_REPLAY);
        let mut t = v.split_whitespace();
        if t.next()? != "dlq" {
            return None;
        }
        let letter = t.next()?.parse().ok()?;
        Some(Self {
            letter,
            handler: t.next().map(str::to_owned),
        })
    }
}

/// The dead letters replayed among `events`: (event id, copy).
pub(super) fn replayed_letters(events: &[&Seen]) -> Vec<(String, DlqCopy)> {
    events
        .iter()
        .filter_map(|e| Some((get(&e.headers, h::CE_ID), DlqCopy::of(&e.headers)?)))
        .collect()
}

/// The state `handler` has for event `id` when the event is a dead
/// letter's copy (`copy`), or the original of one (`replayed` holds its
/// copies): `None` when neither says more than the stream and inbox do.
pub(super) fn of_copy(
    copy: Option<&DlqCopy>,
    replayed: &[(String, DlqCopy)],
    id: &str,
    handler: &str,
) -> Option<Step> {
    match copy {
        // The copy: another handler took the original, and skips it.
        Some(c) => c
            .handler
            .as_deref()
            .filter(|h| *h != handler)
            .map(|_| Step::Duplicate),
        // The original: this handler dead-lettered it, and it was replayed.
        None => replayed
            .iter()
            .filter(|(of, c)| of == id && c.handler.as_deref() == Some(handler))
            .map(|(_, c)| c.letter)
            .max()
            .map(|letter| Step::DeadLetteredThenReplayed { letter }),
    }
}

pub(super) async fn step_of(
    js: &jetstream::Context,
    service: &str,
    hm: &crate::registry::HandlerManifest,
    e: &Seen,
    id: &str,
    letters: &[Seen],
    read: &mut Read,
) -> Step {
    if let Some(l) = letters.iter().find(|l| {
        get(&l.headers, h::CE_ID) == id
            && get(&l.headers, crate::dlq::SERVICE) == service
            && get(&l.headers, crate::dlq::HANDLER) == hm.name
    }) {
        return Step::DeadLettered {
            reason: get(&l.headers, crate::dlq::REASON),
        };
    }
    if hm.options.idempotent
        && let Ok(id) = id.parse()
        && let Some(ms) = read.inboxes.recorded(js, service, &hm.name, id).await
    {
        return Step::Handled { at_ms: ms };
    }
    let floors = &mut read.floors;
    if !floors.contains_key(&hm.durable) {
        let floor = match js
            .get_consumer_from_stream::<consumer::pull::Config, _, _>(&hm.durable, &e.stream)
            .await
        {
            Ok(mut c) => c
                .info()
                .await
                .map(|i| (i.ack_floor.stream_sequence, i.delivered.stream_sequence))
                .unwrap_or_default(),
            Err(_) => (0, 0),
        };
        floors.insert(hm.durable.clone(), floor);
    }
    let (acked, delivered) = floors[&hm.durable];
    if e.sequence <= acked {
        return Step::Acknowledged;
    }
    if hm.options.idempotent
        && let Ok(id) = id.parse()
        && let Some(inbox) = read.inboxes.view(js, service).await
        && let Some(note) = inbox.note(&hm.name, id).await
    {
        return match note {
            crate::inbox::Note::Running { at_ms, attempt, of } => Step::Running {
                attempt,
                max_deliver: of,
                at_ms,
            },
            crate::inbox::Note::Retrying {
                attempt,
                of,
                retry_at_ms,
                error,
            } => Step::Retrying {
                attempt,
                max_deliver: of,
                retry_at_ms,
                error,
            },
        };
    }
    if e.sequence > delivered {
        Step::NotDelivered
    } else {
        Step::InFlight
    }
}
