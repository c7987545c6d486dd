//! Finding the flow of one id without reading every header of the window:
//! what makes `choreo trace <id>` fast in a busy stream.
//!
//! Subjects carry business keys, not ids, so the server cannot look an id
//! up. Two things bound where it can be:
//!
//! - a random (v7) id carries the time it was made: the event is stored
//!   within seconds of it;
//! - a handled event is recorded in its handlers' inboxes with the time it
//!   was handled, which is after it was stored. And a handler records an
//!   event only after everything it emitted was stored, so an event's
//!   children are stored before its handlers' records.
//!
//! So [`flow_of`] finds the id's event in a short stretch before its time
//! (widening back to the window's start if it must), then its flow's root
//! the same way, then reads forward from the root only as far as the
//! newest record of any of the flow's events, in rounds, as children show
//! up. An event some handler has not recorded (in flight, dead-lettered,
//! or a handler without an inbox) leaves the flow open: it is read to the
//! window's end, as without this.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use time::OffsetDateTime;

use super::{Inboxes, Seen, get, read, read_where};
use crate::event::id::EventId;
use crate::registry::{HandlerManifest, Manifest};
use crate::wire::headers as h;

/// How far an inbox record's clock (an instance's) or a v7 id's clock (a
/// publisher's) may be from the server's, which stamps stored events.
const SKEW: Duration = Duration::from_secs(5);

/// How far back from an upper bound (its first inbox record, plus
/// [`SKEW`]) the id's event is looked for, in turn: a live handler records
/// an event well within a second of its storing, a backlog much later.
const BACK: [Duration; 4] = [
    Duration::from_secs(6),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
];

fn at_ms(ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// What a look-up reads: the streams, and the services' inboxes through
/// the trace's cache (its steps read the same records again).
struct Finder<'a, 'r> {
    js: &'a jetstream::Context,
    streams: &'a BTreeSet<String>,
    /// Every handler, with its service.
    handlers: Vec<(&'a str, &'a HandlerManifest)>,
    inboxes: &'r mut Inboxes,
    /// The window's start and end: nothing is read outside it.
    window: (OffsetDateTime, OffsetDateTime),
}

impl<'a> Finder<'a, '_> {
    /// When `handler` of `service` recorded `id`, if it did.
    async fn recorded(&mut self, service: &'a str, handler: &str, id: EventId) -> Option<u64> {
        self.inboxes.recorded(self.js, service, handler, id).await
    }

    /// The earliest time any handler recorded `id`: the event was stored
    /// before it.
    async fn first_record(&mut self, id: EventId) -> Option<u64> {
        let mut first: Option<u64> = None;
        let handlers: Vec<_> = self
            .handlers
            .iter()
            .filter(|(_, hm)| hm.options.idempotent)
            .map(|(s, hm)| (*s, hm.name.as_str()))
            .collect();
        for (service, handler) in handlers {
            if let Some(ms) = self.recorded(service, handler, id).await {
                first = Some(first.map_or(ms, |f| f.min(ms)));
            }
        }
        first
    }

    /// Every stream's events stored between `from` and `to` (clamped to
    /// the window) whose header `name` is `value`.
    async fn read(
        &self,
        (from, to): (OffsetDateTime, OffsetDateTime),
        name: &str,
        value: &str,
    ) -> Vec<Seen> {
        let (from, to) = (from.max(self.window.0), to.min(self.window.1));
        let keep = |hd: &async_nats::HeaderMap| hd.get(name).is_some_and(|v| v.as_str() == value);
        let mut out = Vec::new();
        if from <= to {
            for s in self.streams {
                read_where(self.js, s, ">", (from, to), keep, &mut out).await;
            }
        }
        out
    }

    /// The stored event with id `id`: looked for just around its v7 time,
    /// else in widening stretches before its first inbox record.
    async fn locate(&mut self, id: EventId) -> Option<Seen> {
        let wanted = id.to_string();
        if let Some(t) = made_at(id) {
            let found = self.read((t - SKEW, t + SKEW), h::CE_ID, &wanted).await;
            return found.into_iter().next();
        }
        let upper = at_ms(self.first_record(id).await?) + SKEW;
        let mut to = upper;
        for back in BACK {
            let from = upper - back;
            let found = self.read((from, to), h::CE_ID, &wanted).await;
            if let Some(e) = found.into_iter().next() {
                return Some(e);
            }
            if from <= self.window.0 {
                break;
            }
            to = from;
        }
        None
    }

    /// How far the flow of `events` can reach: the newest record of any
    /// handler of any of them, or `None` if one is not recorded (the flow
    /// may still go on).
    async fn reach(&mut self, events: &[Seen]) -> Option<u64> {
        let mut reach = 0;
        for e in events {
            let event_type = get(&e.headers, h::CE_TYPE);
            let id: EventId = get(&e.headers, h::CE_ID).parse().ok()?;
            let consumers: Vec<_> = self
                .handlers
                .iter()
                .filter(|(_, hm)| {
                    hm.consumes.event == event_type
                        && crate::event::subject::covers(&hm.consumes.subject_filter, &e.subject)
                })
                .map(|(s, hm)| (*s, hm.name.as_str(), hm.options.idempotent))
                .collect();
            for (service, handler, idempotent) in consumers {
                if !idempotent {
                    return None;
                }
                reach = reach.max(self.recorded(service, handler, id).await?);
            }
        }
        Some(reach)
    }
}

/// The time a random (v7) id was made, if it is one.
pub(super) fn made_at(id: EventId) -> Option<OffsetDateTime> {
    let (s, n) = id.as_uuid().get_timestamp()?.to_unix();
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(s) * 1_000_000_000 + i128::from(n)).ok()
}

/// The stored headers of the flow `id` belongs to (`id` is one of its
/// events, or its correlation id), read as the module says, or `None`
/// if the id's event cannot be placed (its id is keyed and no inbox
/// records it): then the caller reads the whole window.
pub(super) async fn flow_of(
    js: &jetstream::Context,
    manifests: &[Manifest],
    streams: &BTreeSet<String>,
    id: EventId,
    window: (OffsetDateTime, OffsetDateTime),
    inboxes: &mut Inboxes,
) -> Option<Vec<Seen>> {
    let handlers = manifests
        .iter()
        .flat_map(|m| m.handlers.iter().map(|hm| (m.service.as_str(), hm)))
        .collect();
    let mut f = Finder {
        js,
        streams,
        handlers,
        inboxes,
        window,
    };
    let event = f.locate(id).await?;
    let correlation = get(&event.headers, h::CE_CORRELATIONID);
    let root = match correlation.parse::<EventId>() {
        Ok(c) if c != id => f.locate(c).await,
        _ => None,
    }
    .unwrap_or(event);
    let mut from = root.published - SKEW;
    let mut to = root.published + SKEW;
    let mut flow: Vec<Seen> = Vec::new();
    let mut have: HashSet<(String, u64)> = HashSet::new();
    loop {
        for e in f.read((from, to), h::CE_CORRELATIONID, &correlation).await {
            if have.insert((e.stream.clone(), e.sequence)) {
                flow.push(e);
            }
        }
        if to >= f.window.1 {
            return Some(flow);
        }
        let next = match f.reach(&flow).await {
            Some(ms) => at_ms(ms) + SKEW,
            None => f.window.1,
        };
        if next <= to {
            return Some(flow);
        }
        (from, to) = (to, next);
    }
}

/// How many flows a subject query follows one by one (each read only as
/// far as it reaches, see `locate`); past this, one read of every header
/// in the window finds them all.
const FLOWS_ONE_BY_ONE: usize = 32;

/// `seen` (events a subject query matched) with every other event of the
/// flows in `wanted` (their correlation ids) in the window.
pub(super) async fn whole_flows(
    js: &jetstream::Context,
    (manifests, streams): (&[crate::registry::Manifest], &BTreeSet<String>),
    wanted: &BTreeSet<String>,
    (start, end): (time::OffsetDateTime, time::OffsetDateTime),
    inboxes: &mut Inboxes,
    mut seen: Vec<Seen>,
) -> Vec<Seen> {
    let mut have: HashSet<(String, u64)> = seen
        .iter()
        .map(|e| (e.stream.clone(), e.sequence))
        .collect();
    let mut unplaced = wanted.len() > FLOWS_ONE_BY_ONE;
    if !unplaced {
        for corr in wanted {
            let flow = match corr.parse::<EventId>() {
                Ok(id) => flow_of(js, manifests, streams, id, (start, end), inboxes).await,
                Err(_) => None,
            };
            match flow {
                Some(flow) => {
                    for e in flow {
                        if have.insert((e.stream.clone(), e.sequence)) {
                            seen.push(e);
                        }
                    }
                }
                None => unplaced = true,
            }
        }
    }
    if unplaced {
        let mut all = Vec::new();
        for s in streams {
            read(js, s, ">", start, end, &mut all).await;
        }
        for e in all {
            if wanted.contains(&get(&e.headers, h::CE_CORRELATIONID))
                && have.insert((e.stream.clone(), e.sequence))
            {
                seen.push(e);
            }
        }
    }
    seen
}
