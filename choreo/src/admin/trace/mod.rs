//! One flow as its causation tree, with every handler's state for every
//! event: what `choreo trace` prints.
//!
//! Reads are bounded. Only headers are read, with ordered consumers that
//! start at the window's start on each stream the registry names (and the
//! dead-letter stream); a subject query reads only its subjects, so the
//! server's subject index does the search, and an id query reads only the
//! stretch its flow can reach (see `locate`). The window is the hour after
//! a random (v7) root id's time, or the given one (`since`, default the
//! last hour) for keyed ids and subjects.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;

use super::AdminError;
use crate::wire::headers as h;
use deadline::{deadline_step, is_deadline_helper};

mod deadline;
mod locate;
mod read;
mod render;
mod steps;

pub(in crate::admin) use read::{read, read_where};
pub use render::{Arrow, sequence_diagram};

/// What to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Query {
    /// An event id or a correlation id: the flow it belongs to.
    Id(crate::EventId),
    /// A subject or a filter (`orders.o-42.>`): the flows of one business key.
    Subject(String),
}

impl std::str::FromStr for Query {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(id) = s.parse::<crate::EventId>() {
            return Ok(Self::Id(id));
        }
        if s.contains('.') && !s.contains(char::is_whitespace) {
            return Ok(Self::Subject(s.to_owned()));
        }
        Err(format!(
            "{s:?} is neither an event or correlation id (a UUID) nor a subject like orders.o-42.>"
        ))
    }
}

/// One handler's state for one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Step {
    /// Its inbox records the event as handled, at this Unix ms.
    Handled {
        /// When.
        at_ms: u64,
    },
    /// Acknowledged (the handler keeps no inbox).
    Acknowledged,
    /// A second copy of an event already stored: the inbox skips it.
    Duplicate,
    /// Not delivered to the handler yet.
    NotDelivered,
    /// Delivered, not yet done: running or waiting for a retry (the
    /// handler keeps no inbox, or its claim key says nothing yet: a claim is
    /// written once a handler has run for a second).
    InFlight,
    /// Running: its claim says on which attempt.
    Running {
        /// This attempt (1 for the first delivery).
        attempt: u32,
        /// The handler's `max_deliver`.
        max_deliver: u32,
        /// When the claim was last refreshed (Unix ms).
        at_ms: u64,
    },
    /// An attempt failed and the next is due: what its retry note says.
    Retrying {
        /// The attempt that failed.
        attempt: u32,
        /// The handler's `max_deliver`.
        max_deliver: u32,
        /// When the next attempt is due (Unix ms).
        retry_at_ms: u64,
        /// The failed attempt's error (its first 300 characters).
        error: String,
    },
    /// In the dead-letter stream.
    DeadLettered {
        /// The reason code.
        reason: String,
    },
    /// Dead-lettered, then replayed from the dead-letter stream (`choreo
    /// dlq replay`): its copy, marked with the letter, is the event the
    /// handler took again.
    DeadLetteredThenReplayed {
        /// The letter's sequence in the dead-letter stream.
        letter: u64,
    },
    /// A deadline handler's deadline for this event is pending.
    DeadlinePending {
        /// When it fires (Unix ms).
        fires_at_ms: u64,
    },
    /// A deadline handler's deadline is past due and not decided yet: it
    /// is about to fire, or waits for a B watcher to handle every B stored
    /// by the due time.
    DeadlineDue {
        /// When it fell due (Unix ms).
        due_ms: u64,
    },
    /// A deadline handler's deadline was met: an `unless` event came in
    /// time, and the handler does not run.
    DeadlineMet {
        /// The event that met it.
        by: String,
    },
    /// A deadline handler's deadline fired: the handler runs with this
    /// event.
    DeadlineFired {
        /// When it fired (Unix ms).
        at_ms: u64,
        /// When the handler's inbox recorded it as handled, if it has.
        handled_at_ms: Option<u64>,
    },
}

/// One handler subscribed to an event, and its state for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HandlerStep {
    /// `<service>.<handler>`.
    pub handler: String,
    /// Its state for the event.
    pub step: Step,
}

/// One event of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TracedEvent {
    /// `ce-type`.
    pub event_type: String,
    /// `ce-id`.
    pub id: String,
    /// `ce-source`.
    pub source: String,
    /// `ce-time`.
    pub time: String,
    /// Its subject.
    pub subject: String,
    /// Its stream and sequence there.
    pub stream: String,
    /// Its sequence in the stream.
    pub sequence: u64,
    /// `ce-causationid` (none on a root).
    pub causation_id: Option<String>,
    /// On a copy a replay stored again, what replayed it: its
    /// `choreo-replay` header (`dlq <letter> <service>.<handler>` for a
    /// dead letter's replay).
    pub replay: Option<String>,
    /// When the server stored it (Unix ms): a copy's `ce-time` is its
    /// original's.
    pub stored_ms: u64,
    /// Each handler that consumes it.
    pub handlers: Vec<HandlerStep>,
}

/// One flow: the events sharing a correlation id, in stream time order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Flow {
    /// The correlation id.
    pub correlation_id: String,
    /// Its events.
    pub events: Vec<TracedEvent>,
}

/// Every flow a [`Query`] finds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Trace {
    /// The flows, oldest first.
    pub flows: Vec<Flow>,
}

/// Headers of one stored event.
pub(super) struct Seen {
    pub(super) headers: async_nats::HeaderMap,
    pub(super) subject: String,
    pub(super) stream: String,
    pub(super) sequence: u64,
    /// When the server stored it.
    pub(super) published: time::OffsetDateTime,
}

pub(super) fn get(m: &async_nats::HeaderMap, name: &str) -> String {
    m.get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// A time as RFC 3339 (for messages).
fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Finds the flows of `query` in the window from `since` (default: the
/// hour after a random root id's time, else the last hour) for `window`.
///
/// # Errors
/// The registry cannot be read, or the query matches nothing in the window.
pub async fn trace(
    js: &jetstream::Context,
    query: &Query,
    since: Option<time::OffsetDateTime>,
    window: Duration,
) -> Result<Trace, AdminError> {
    let what = "a trace";
    let (manifests, publishers) = super::manifests(js).await?;
    let now = time::OffsetDateTime::now_utc();
    let start = since.unwrap_or_else(|| match query {
        Query::Id(id) => locate::made_at(*id).map_or(now - window, |t| t - Duration::from_secs(60)),
        Query::Subject(_) => now - window,
    });
    let end = start + window;
    let mut streams: BTreeSet<String> = BTreeSet::new();
    for m in &manifests {
        for hm in &m.handlers {
            // The deadline stream holds schedules and decisions, not
            // events: a deadline shows as its handler's step.
            if hm.consumes.stream != crate::deadline::STREAM {
                streams.insert(hm.consumes.stream.clone());
            }
            for e in hm.emits.iter().flatten() {
                streams.insert(e.stream.clone());
            }
        }
    }
    for p in &publishers {
        streams.insert(p.event.stream.clone());
    }
    // A subject query reads only its subjects (the server filters by its
    // subject index). An id query reads only as far as its flow can reach
    // (see `locate`), or where the id cannot be placed, every header in
    // the window.
    let mut cache = Read::default();
    let located = match query {
        Query::Id(id) => {
            let window = (start, end);
            locate::flow_of(js, &manifests, &streams, *id, window, &mut cache.inboxes).await
        }
        Query::Subject(_) => None,
    };
    let seen = match located {
        Some(seen) => seen,
        None => {
            let filter = match query {
                Query::Subject(f) => f.as_str(),
                Query::Id(_) => ">",
            };
            let mut seen = Vec::new();
            for s in &streams {
                read(js, s, filter, start, end, &mut seen).await;
            }
            seen
        }
    };
    // Which correlation ids the query names.
    let wanted: BTreeSet<String> = match query {
        Query::Id(id) => {
            let id = id.to_string();
            seen.iter()
                .filter(|e| {
                    get(&e.headers, h::CE_ID) == id || get(&e.headers, h::CE_CORRELATIONID) == id
                })
                .map(|e| get(&e.headers, h::CE_CORRELATIONID))
                .collect()
        }
        Query::Subject(filter) => seen
            .iter()
            .filter(|e| crate::event::subject::covers(filter, &e.subject))
            .map(|e| get(&e.headers, h::CE_CORRELATIONID))
            .collect(),
    };
    if wanted.is_empty() {
        return Err(AdminError::bad_request(
            what,
            format!(
                "no event matches in {} between {} and {}; widen the window with --since",
                streams.iter().cloned().collect::<Vec<_>>().join(", "),
                rfc3339(start),
                rfc3339(end)
            ),
        ));
    }
    // A subject names some of a flow's events; the flow goes on under other
    // subjects (a payment's, a shipment's). Each matching flow is read
    // whole.
    let seen = match query {
        Query::Subject(_) => {
            let window = (start, end);
            locate::whole_flows(
                js,
                (&manifests, &streams),
                &wanted,
                window,
                &mut cache.inboxes,
                seen,
            )
            .await
        }
        Query::Id(_) => seen,
    };
    // Who consumes what, and what each has done.
    let mut consumers: HashMap<&str, Vec<(&str, &crate::registry::HandlerManifest)>> =
        HashMap::new();
    for m in &manifests {
        for hm in &m.handlers {
            consumers
                .entry(hm.consumes.event.as_str())
                .or_default()
                .push((m.service.as_str(), hm));
        }
    }
    let mut letters = Vec::new();
    read(
        js,
        crate::dlq::DLQ_STREAM,
        crate::dlq::DLQ_SUBJECTS,
        start,
        end + Duration::from_secs(7 * 24 * 3600),
        &mut letters,
    )
    .await;
    let mut flows = Vec::new();
    for corr in wanted {
        let mut ids_seen = BTreeSet::new();
        let mut events = Vec::new();
        let mut mine: Vec<&Seen> = seen
            .iter()
            .filter(|e| get(&e.headers, h::CE_CORRELATIONID) == corr)
            .collect();
        mine.sort_by_key(|e| (get(&e.headers, h::CE_TIME), e.sequence));
        // The dead letters replayed in this flow, by event id.
        let replayed = steps::replayed_letters(&mine);
        for e in mine {
            let id = get(&e.headers, h::CE_ID);
            let event_type = get(&e.headers, h::CE_TYPE);
            let replay = Some(get(&e.headers, h::CHOREO_REPLAY)).filter(|r| !r.is_empty());
            let copy = steps::DlqCopy::of(&e.headers);
            // A second copy is a duplicate unless a replay stored it.
            let duplicate = !ids_seen.insert(id.clone()) && replay.is_none();
            let mut handlers = Vec::new();
            for (service, hm) in consumers.get(event_type.as_str()).into_iter().flatten() {
                // A deadline's helpers show as its handler's step.
                if is_deadline_helper(&manifests, service, &hm.name) {
                    continue;
                }
                let deadline = hm
                    .deadline
                    .as_ref()
                    .filter(|d| d.matched_by == "correlation");
                if deadline.is_none()
                    && !crate::event::subject::covers(&hm.consumes.subject_filter, &e.subject)
                {
                    continue;
                }
                let handler = format!("{service}.{}", hm.name);
                let step = if duplicate {
                    Step::Duplicate
                } else if deadline.is_some() {
                    deadline_step(js, service, hm, &corr, &id, &mut cache).await
                } else if let Some(step) = steps::of_copy(copy.as_ref(), &replayed, &id, &handler) {
                    step
                } else {
                    steps::step_of(js, service, hm, e, &id, &letters, &mut cache).await
                };
                handlers.push(HandlerStep { handler, step });
            }
            let causation = get(&e.headers, h::CE_CAUSATIONID);
            events.push(TracedEvent {
                event_type,
                source: get(&e.headers, h::CE_SOURCE),
                time: get(&e.headers, h::CE_TIME),
                subject: e.subject.clone(),
                stream: e.stream.clone(),
                sequence: e.sequence,
                causation_id: (!causation.is_empty()).then_some(causation),
                replay,
                stored_ms: u64::try_from(e.published.unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or(0),
                handlers,
                id,
            });
        }
        flows.push(Flow {
            correlation_id: corr,
            events,
        });
    }
    flows.sort_by(|a, b| {
        a.events
            .first()
            .map(|e| &e.time)
            .cmp(&b.events.first().map(|e| &e.time))
    });
    Ok(Trace { flows })
}

/// What one trace has read of the server and reuses for every event: each
/// durable's (ack floor, last delivered), and the inboxes.
#[derive(Default)]
pub(super) struct Read {
    pub(super) floors: HashMap<String, (u64, u64)>,
    pub(super) inboxes: Inboxes,
}

/// Each service's inbox, opened once per trace, and the records read from
/// them (placing an id reads the records its steps show).
#[derive(Default)]
pub(super) struct Inboxes {
    open: HashMap<String, Option<crate::inbox::View>>,
    records: HashMap<(String, String, crate::EventId), Option<u64>>,
}

impl Inboxes {
    pub(super) async fn view(
        &mut self,
        js: &jetstream::Context,
        service: &str,
    ) -> Option<&crate::inbox::View> {
        if !self.open.contains_key(service) {
            let view = crate::inbox::View::open(js, service).await;
            self.open.insert(service.to_owned(), view);
        }
        self.open.get(service)?.as_ref()
    }

    /// When `handler` of `service` recorded `id` as handled, if it did.
    pub(super) async fn recorded(
        &mut self,
        js: &jetstream::Context,
        service: &str,
        handler: &str,
        id: crate::EventId,
    ) -> Option<u64> {
        let key = (service.to_owned(), handler.to_owned(), id);
        if let Some(at) = self.records.get(&key) {
            return *at;
        }
        let at = match self.view(js, service).await {
            Some(inbox) => inbox.handled_at(handler, id).await,
            None => None,
        };
        self.records.insert(key, at);
        at
    }
}
