//! One flow as its causation tree, with every handler's state for every
//! event: what `choreo trace` prints.
//!
//! Reads are bounded. Only headers are read, with ordered consumers that
//! start at the window's start on each stream the registry names (and the
//! dead-letter stream); a subject query reads only its subjects, so the
//! server's subject index does the search. The window is the hour after a random (v7) root id's
//! time, or the given one (`since`, default the last hour) for keyed ids
//! and subjects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde::Serialize;

use super::AdminError;
use crate::wire::headers as h;

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
    /// Delivered, not yet done: running or waiting for a retry.
    InFlight,
    /// In the dead-letter stream.
    DeadLettered {
        /// The reason code.
        reason: String,
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
struct Seen {
    headers: async_nats::HeaderMap,
    subject: String,
    stream: String,
    sequence: u64,
}

fn get(m: &async_nats::HeaderMap, name: &str) -> String {
    m.get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
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
        Query::Id(id) => id
            .as_uuid()
            .get_timestamp()
            .and_then(|t| {
                let (s, n) = t.to_unix();
                time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(s) * 1_000_000_000 + i128::from(n),
                )
                .ok()
            })
            .map_or(now - window, |t| t - Duration::from_secs(60)),
        Query::Subject(_) => now - window,
    });
    let end = start + window;
    let mut streams: BTreeSet<String> = BTreeSet::new();
    for m in &manifests {
        for hm in &m.handlers {
            streams.insert(hm.consumes.stream.clone());
            for e in hm.emits.iter().flatten() {
                streams.insert(e.stream.clone());
            }
        }
    }
    for p in &publishers {
        streams.insert(p.event.stream.clone());
    }
    // A subject query reads only its subjects (the server filters by its
    // subject index); an id query reads every header in the window.
    let filter = match query {
        Query::Subject(f) => f.as_str(),
        Query::Id(_) => ">",
    };
    let mut seen = Vec::new();
    for s in &streams {
        read(js, s, filter, start, end, &mut seen).await;
    }
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
                "no event matches in {} between {start} and {end}; widen the window with --since",
                streams.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
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
    let mut read = Read::default();
    let mut flows = Vec::new();
    for corr in wanted {
        let mut ids_seen = BTreeSet::new();
        let mut events = Vec::new();
        let mut mine: Vec<&Seen> = seen
            .iter()
            .filter(|e| get(&e.headers, h::CE_CORRELATIONID) == corr)
            .collect();
        mine.sort_by_key(|e| (get(&e.headers, h::CE_TIME), e.sequence));
        for e in mine {
            let id = get(&e.headers, h::CE_ID);
            let event_type = get(&e.headers, h::CE_TYPE);
            let duplicate = !ids_seen.insert(id.clone());
            let mut handlers = Vec::new();
            for (service, hm) in consumers.get(event_type.as_str()).into_iter().flatten() {
                if !crate::event::subject::covers(&hm.consumes.subject_filter, &e.subject) {
                    continue;
                }
                let step = if duplicate {
                    Step::Duplicate
                } else {
                    step_of(js, service, hm, e, &id, &letters, &mut read).await
                };
                handlers.push(HandlerStep {
                    handler: format!("{service}.{}", hm.name),
                    step,
                });
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

/// Headers of `stream`'s events on `filter` stored between `start` and `end`.
async fn read(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start: time::OffsetDateTime,
    end: time::OffsetDateTime,
    out: &mut Vec<Seen>,
) {
    let Ok(s) = js.get_stream(stream).await else {
        return;
    };
    // Nothing stored in the window: no need to wait for it.
    let state = &s.cached_info().state;
    if state.messages == 0 || state.last_timestamp < start {
        return;
    }
    let Ok(c) = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            headers_only: true,
            ..Default::default()
        })
        .await
    else {
        return;
    };
    let Ok(mut msgs) = c.messages().await else {
        return;
    };
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        let Ok(info) = m.info() else { break };
        if info.published > end {
            break;
        }
        let (sequence, pending) = (info.stream_sequence, info.pending);
        out.push(Seen {
            headers: m.headers.clone().unwrap_or_default(),
            subject: m.subject.to_string(),
            stream: stream.to_owned(),
            sequence,
        });
        if pending == 0 {
            break;
        }
    }
}

/// What one trace has read of the server and reuses for every event: each
/// durable's (ack floor, last delivered), and each service's inbox.
#[derive(Default)]
struct Read {
    floors: HashMap<String, (u64, u64)>,
    inboxes: HashMap<String, Option<crate::inbox::View>>,
}

async fn step_of(
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
    if hm.options.idempotent && !read.inboxes.contains_key(service) {
        let inbox = crate::inbox::View::open(js, service).await;
        read.inboxes.insert(service.to_owned(), inbox);
    }
    if hm.options.idempotent
        && let Ok(id) = id.parse()
        && let Some(Some(inbox)) = read.inboxes.get(service)
        && let Some(ms) = inbox.handled_at(&hm.name, id).await
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
        Step::Acknowledged
    } else if e.sequence > delivered {
        Step::NotDelivered
    } else {
        Step::InFlight
    }
}

impl Flow {
    /// The flow as a causation tree, each event with its handlers' states.
    /// With `times`, each line says when.
    pub fn tree(&self, times: bool) -> String {
        let by_id: BTreeMap<&str, &TracedEvent> =
            self.events.iter().map(|e| (e.id.as_str(), e)).collect();
        let mut children: BTreeMap<&str, Vec<&TracedEvent>> = BTreeMap::new();
        let mut roots = Vec::new();
        for e in &self.events {
            match e.causation_id.as_deref().filter(|c| by_id.contains_key(c)) {
                Some(c) => children.entry(c).or_default().push(e),
                None => roots.push(e),
            }
        }
        let mut out = format!("flow {}\n", self.correlation_id);
        for r in roots {
            node(&mut out, r, &children, "", true, times);
        }
        out
    }

    /// The flow as a Mermaid sequence diagram: each event an arrow from
    /// its source to each handler that consumes it.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("sequenceDiagram\n");
        for e in &self.events {
            if e.handlers.is_empty() {
                out.push_str(&format!(
                    "    {}->>{}: {}\n",
                    e.source, e.source, e.event_type
                ));
            }
            for hs in &e.handlers {
                let service = hs.handler.split('.').next().unwrap_or_default();
                out.push_str(&format!(
                    "    {}->>{}: {} ({})\n",
                    e.source,
                    service,
                    e.event_type,
                    step_text(&hs.step)
                ));
            }
        }
        out
    }
}

fn step_text(s: &Step) -> String {
    match s {
        Step::Handled { .. } => "handled".into(),
        Step::Acknowledged => "acknowledged".into(),
        Step::Duplicate => "skipped as a duplicate".into(),
        Step::NotDelivered => "not yet delivered".into(),
        Step::InFlight => "in flight or retrying".into(),
        Step::DeadLettered { reason } => format!("dead-lettered: {reason}"),
    }
}

fn node(
    out: &mut String,
    e: &TracedEvent,
    children: &BTreeMap<&str, Vec<&TracedEvent>>,
    prefix: &str,
    last: bool,
    times: bool,
) {
    let (branch, more) = if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    };
    let when = if times {
        format!(" {}", e.time)
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{prefix}{branch}{} [{}]{when} {}\n",
        e.event_type, e.source, e.subject
    ));
    let inner = format!("{prefix}{more}");
    let kids = children.get(e.id.as_str()).cloned().unwrap_or_default();
    for (i, hs) in e.handlers.iter().enumerate() {
        let last_line = kids.is_empty() && i + 1 == e.handlers.len();
        let mark = if last_line { "└· " } else { "├· " };
        out.push_str(&format!(
            "{inner}{mark}{}: {}\n",
            hs.handler,
            step_text(&hs.step)
        ));
    }
    for (i, k) in kids.iter().enumerate() {
        node(out, k, children, &inner, i + 1 == kids.len(), times);
    }
}
