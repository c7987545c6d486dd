//! Folding what a load reads: each stored event decoded by its type and
//! version, applied to the state, watched for writes outside the checked
//! path and for an earlier decision of the handled event, and the moment a
//! snapshot is taken.

use std::collections::HashSet;

use time::OffsetDateTime;

use super::append::{BATCH_ID, EXPECTED_SUBJECT};
use super::cache::{Entry, Recent};
use super::error::{AggregateError, AggregateErrorKind};
use super::read::Raw;
use super::snapshot::SnapshotPolicy;
use super::store::{Appended, Decided, Loaded};
use super::{Aggregate, AggregateEvent};
use crate::event::EventId;
use crate::wire::headers::Metadata;

/// A stored event's metadata and the event.
pub(super) fn decode<A: Aggregate>(
    id: &str,
    raw: &Raw,
) -> Result<(A::Event, Metadata), AggregateError> {
    let fail = |kind, detail: String| AggregateError::new(A::NAME, id, kind, detail);
    let meta = Metadata::from_headers(&raw.headers).map_err(|e| {
        fail(
            AggregateErrorKind::Decode,
            format!("event #{} on {}: {e}", raw.sequence, raw.subject),
        )
        .with_source(e)
    })?;
    match A::Event::decode(meta.event_type(), meta.version(), &raw.payload) {
        Some(Ok(event)) => Ok((event, meta)),
        Some(Err(e)) => Err(fail(
            AggregateErrorKind::Decode,
            format!(
                "{} {} (#{} on {}): {e}",
                meta.event_type(),
                meta.id(),
                raw.sequence,
                raw.subject
            ),
        )
        .with_source(e)),
        None => Err(fail(
            AggregateErrorKind::ForeignEvent,
            format!(
                "{} {} (#{} on {}) is not one of its event types, so this code cannot fold it",
                meta.event_type(),
                meta.id(),
                raw.sequence,
                raw.subject
            ),
        )),
    }
}

/// The handled event a decision runs for, and the decision.
#[derive(Clone, Debug)]
pub(super) struct Cause {
    /// The handled event's id.
    pub(super) id: EventId,
    /// The service that handles it.
    pub(super) source: String,
    /// What the decision's event ids derive from (the handler, the
    /// instances, the decision's place among the handler's decisions on
    /// them).
    pub(super) ns: String,
}

impl Cause {
    /// Of `found` (events of this service caused by this event), those this
    /// decision appended: their ids are the ones it derives, so a second
    /// decision of the same handler on the same instance does not take the
    /// first one's events for its own.
    pub(super) fn made<A: Aggregate>(&self, found: Vec<Appended>) -> Vec<Appended> {
        let n = found.len() as u32;
        found
            .into_iter()
            .filter(|a| {
                A::Event::TYPES.iter().any(|t| {
                    (0..n).any(|i| EventId::emitted(&self.ns, self.id, t.name, i) == a.event_id)
                })
            })
            .collect()
    }
}

/// A state being folded from the events read.
pub(super) struct Fold<A> {
    pub(super) filter: String,
    pub(super) state: A,
    pub(super) version: u64,
    pub(super) events: u64,
    /// Events read from the stream.
    pub(super) read: u64,
    /// With a cause: the handled event and the decision.
    pub(super) cause: Option<Cause>,
    /// Events of this service caused by the cause, appended earlier: the
    /// decision's own among them ([`Cause::made`]).
    pub(super) earlier: Vec<Appended>,
    /// After an append whose answer did not come: its events' ids.
    pub(super) ours: HashSet<EventId>,
    /// Those of them read since.
    pub(super) appended_ours: Vec<Appended>,
    /// Whether an event outside the checked path was warned about.
    pub(super) warned: bool,
    /// With snapshots on: when to take one.
    pub(super) capture: Option<Capture>,
    /// The caused events folded since the load began (for the cache).
    pub(super) recent: Vec<Recent>,
    /// Read up to the stream's end during this decision (false: taken from
    /// memory unread).
    pub(super) fresh: bool,
    /// This decision met a conflict on it.
    pub(super) contended: bool,
}

/// Taking a snapshot while a state is folded: of the state just before the
/// first event newer than the policy's lag, if enough events were read
/// since the last snapshot or the load has been slow.
pub(super) struct Capture {
    pub(super) policy: SnapshotPolicy,
    pub(super) cutoff: OffsetDateTime,
    pub(super) started: std::time::Instant,
    /// Events folded since the snapshot the load started from.
    pub(super) since: u64,
    /// The snapshot to write: version, events, state bytes.
    pub(super) taken: Option<(u64, u64, Vec<u8>)>,
    /// Whether the cutoff was passed (nothing more to take).
    pub(super) done: bool,
}

impl Capture {
    pub(super) fn consider<A: Aggregate>(&mut self, state: &A, version: u64, events: u64) {
        self.done = true;
        let slow = self
            .policy
            .slower_than
            .is_some_and(|t| self.started.elapsed() > t);
        if self.since == 0 || (self.since < self.policy.every && !slow) {
            return;
        }
        if let Some(bytes) = state.snapshot() {
            self.taken = Some((version, events, bytes));
        }
    }
}

impl<A: Aggregate> Fold<A> {
    pub(super) fn new(filter: &str, cause: Option<Cause>) -> Self {
        Self {
            filter: filter.to_owned(),
            state: A::default(),
            version: 0,
            events: 0,
            read: 0,
            cause,
            earlier: Vec::new(),
            ours: HashSet::new(),
            appended_ours: Vec::new(),
            warned: false,
            capture: None,
            recent: Vec::new(),
            fresh: true,
            contended: false,
        }
    }

    pub(super) fn take(&mut self, id: &str, raw: Raw) -> Result<(), AggregateError> {
        let (event, meta) = decode::<A>(id, &raw)?;
        self.watch(id, &raw, &meta);
        let appended = || Appended {
            event_id: meta.id(),
            subject: raw.subject.clone(),
            sequence: raw.sequence,
        };
        if let Some(cause) = &self.cause
            && meta.causation_id() == Some(cause.id)
            && meta.source() == cause.source
        {
            self.earlier.push(appended());
        }
        if let Some(causation) = meta.causation_id() {
            self.recent.push(Recent {
                causation,
                source: meta.source().to_owned(),
                appended: appended(),
                stored_at: raw.stored_at,
            });
        }
        if self.ours.contains(&meta.id()) {
            self.appended_ours.push(appended());
        }
        if let Some(c) = &mut self.capture {
            if !c.done && raw.stored_at > c.cutoff {
                c.consider(&self.state, self.version, self.events);
            }
            c.since += 1;
        }
        self.state.apply(&event);
        self.version = raw.sequence;
        self.events += 1;
        self.read += 1;
        Ok(())
    }

    /// Warns once per load about an event not appended through the checked
    /// path: the guard that keeps decisions on fresh state does not hold
    /// for writers that skip it.
    fn watch(&mut self, id: &str, raw: &Raw, meta: &Metadata) {
        if self.warned || raw.headers.get(BATCH_ID).is_some() {
            return;
        }
        let checked = raw
            .headers
            .get(EXPECTED_SUBJECT)
            .map(|v| v.as_str().to_owned());
        let problem = match checked {
            None => "was appended without the concurrency check (a plain publish?)".to_owned(),
            Some(f) if f != self.filter => format!(
                "was checked against {f}, not the aggregate's filter {}",
                self.filter
            ),
            Some(_) => return,
        };
        self.warned = true;
        tracing::warn!(
            aggregate = A::NAME,
            aggregate_id = id,
            event = meta.event_type(),
            event_id = %meta.id(),
            sequence = raw.sequence,
            "{} {} on {} {problem}: decisions on this aggregate may run on stale state",
            meta.event_type(),
            meta.id(),
            raw.subject
        );
    }

    /// Starts from a cached state: its events count as read before, and
    /// `earlier` are the cause's events among the recent ones it folded.
    pub(super) fn resume(&mut self, entry: Entry<A>, earlier: Vec<Appended>) {
        self.earlier.extend(earlier);
        self.state = entry.state;
        self.version = entry.version;
        self.events = entry.events;
    }

    /// What the cache keeps of this state, and the caused events folded
    /// since it was taken from the cache (handed over).
    pub(super) fn entry(&mut self) -> (Entry<A>, Vec<Recent>) {
        let entry = Entry {
            state: self.state.clone(),
            version: self.version,
            events: self.events,
            contended: self.contended,
        };
        (entry, std::mem::take(&mut self.recent))
    }

    /// What a decision on this state did.
    pub(super) fn decided(
        &mut self,
        appended: Vec<Appended>,
        earlier: bool,
        attempts: u32,
    ) -> Decided<A> {
        let loaded = self.loaded();
        Decided {
            state: loaded.state,
            version: loaded.version,
            appended,
            earlier,
            attempts,
        }
    }

    pub(super) fn loaded(&mut self) -> Loaded<A> {
        Loaded {
            state: std::mem::take(&mut self.state),
            version: self.version,
            events: self.events,
            read: self.read,
        }
    }
}
