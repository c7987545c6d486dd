//! The instances a decision is on, whatever their aggregate types: each a
//! [`Slot`] (its fold and the events decided for it) behind the [`Part`]
//! operations the decision loop (`decision.rs`) needs, gathered in
//! [`Parts`].

use std::any::{Any, TypeId};
use std::collections::HashSet;

use futures::future::BoxFuture;
use time::OffsetDateTime;

use super::cache::Recent;
use super::encode::Encode;
use super::error::{AggregateError, AggregateErrorKind};
use super::fold::{Cause, Fold};
use super::read::Raw;
use super::store::{Aggregates, Appended};
use super::{Aggregate, AggregateEvent};
use crate::event::EventId;
/// One instance a decision is on, whatever its aggregate type.
pub(super) trait Part: Any + Send + Sync {
    /// Its aggregate's type and its id: what its turns and cache are keyed
    /// by.
    fn key(&self) -> (TypeId, &str);
    fn name(&self) -> &'static str;
    fn id(&self) -> &str;
    /// Its boundary's filter.
    fn filter(&self) -> &str;
    /// The last sequence read.
    fn version(&self) -> u64;
    /// Its stream's name, if set up already (no wait).
    fn prepared(&self, store: &Aggregates) -> Option<&'static str>;
    /// Takes its state from memory, unread, when it can be trusted (see
    /// `Aggregates::open_in_memory`); false when it must be loaded.
    fn open_in_memory(&mut self, store: &Aggregates) -> bool;
    /// Sets up its stream; its name.
    fn prepare<'s>(
        &'s self,
        store: &'s Aggregates,
    ) -> BoxFuture<'s, Result<&'static str, AggregateError>>;
    /// Makes it look for what the handled event `cause` from service
    /// `source` appended earlier.
    fn set_cause(&mut self, cause: Option<Cause>);
    /// Loads it (cache, snapshot, the events after).
    fn open<'s>(&'s mut self, store: &'s Aggregates) -> BoxFuture<'s, Result<(), AggregateError>>;
    /// Folds one more event read.
    fn take(&mut self, raw: Raw) -> Result<(), AggregateError>;
    /// Whether it was read to the stream's end in this decision.
    fn fresh(&self) -> bool;
    /// It was read to the stream's end.
    fn read_to_end(&mut self);
    /// Others appended to it during this decision.
    fn contended(&mut self);
    /// What an earlier delivery of the handled event appended to it.
    fn earlier(&mut self) -> Vec<Appended>;
    /// Watches the events read next for these ids (an append whose answer
    /// did not come).
    fn expect(&mut self, ours: &[EventId]);
    /// Those of them read since.
    fn ours(&mut self) -> Vec<Appended>;
    /// Encodes the events the decision gave it.
    fn encode(&self, encode: &mut Encode<'_>) -> Result<(), AggregateError>;
    /// Its events were stored as `appended`: folds them in.
    fn stored(&mut self, store: &Aggregates, appended: &[Appended]);
    /// Forgets the events the decision gave it.
    fn clear(&mut self);
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// An instance of `A`: its fold and the events decided for it.
pub(super) struct Slot<A: Aggregate> {
    pub(super) id: String,
    pub(super) fold: Fold<A>,
    pub(super) pending: Vec<A::Event>,
}

impl<A: Aggregate> Slot<A> {
    pub(super) fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            fold: Fold::new(&A::filter(id), None),
            pending: Vec::new(),
        }
    }
}

impl<A: Aggregate> Part for Slot<A> {
    fn key(&self) -> (TypeId, &str) {
        (TypeId::of::<A>(), &self.id)
    }

    fn name(&self) -> &'static str {
        A::NAME
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn filter(&self) -> &str {
        &self.fold.filter
    }

    fn version(&self) -> u64 {
        self.fold.version
    }

    fn prepared(&self, store: &Aggregates) -> Option<&'static str> {
        store.prepared::<A>()
    }

    fn open_in_memory(&mut self, store: &Aggregates) -> bool {
        store.open_in_memory::<A>(&self.id, &mut self.fold)
    }

    fn prepare<'s>(
        &'s self,
        store: &'s Aggregates,
    ) -> BoxFuture<'s, Result<&'static str, AggregateError>> {
        Box::pin(store.prepare::<A>(&self.id))
    }

    fn set_cause(&mut self, cause: Option<Cause>) {
        self.fold.cause = cause;
    }

    fn open<'s>(&'s mut self, store: &'s Aggregates) -> BoxFuture<'s, Result<(), AggregateError>> {
        Box::pin(async move {
            let cause = self.fold.cause.take();
            self.fold = store.open::<A>(&self.id, cause).await?;
            Ok(())
        })
    }

    fn take(&mut self, raw: Raw) -> Result<(), AggregateError> {
        self.fold.take(&self.id, raw)
    }

    fn fresh(&self) -> bool {
        self.fold.fresh
    }

    fn read_to_end(&mut self) {
        self.fold.fresh = true;
    }

    fn contended(&mut self) {
        self.fold.contended = true;
    }

    fn earlier(&mut self) -> Vec<Appended> {
        let found = std::mem::take(&mut self.fold.earlier);
        match &self.fold.cause {
            Some(cause) if !found.is_empty() => cause.made::<A>(found),
            _ => Vec::new(),
        }
    }

    fn expect(&mut self, ours: &[EventId]) {
        self.fold.ours = ours.iter().copied().collect();
    }

    fn ours(&mut self) -> Vec<Appended> {
        std::mem::take(&mut self.fold.appended_ours)
    }

    fn encode(&self, encode: &mut Encode<'_>) -> Result<(), AggregateError> {
        for e in &self.pending {
            e.visit(encode).map_err(|e| {
                AggregateError::new(A::NAME, &self.id, AggregateErrorKind::Append, e.to_string())
                    .with_source(e)
            })?;
        }
        Ok(())
    }

    fn stored(&mut self, store: &Aggregates, appended: &[Appended]) {
        let fold = &mut self.fold;
        for e in self.pending.drain(..) {
            fold.state.apply(&e);
        }
        fold.version = appended.last().map_or(fold.version, |a| a.sequence);
        fold.events += appended.len() as u64;
        if let Some(cause) = &fold.cause {
            let now = OffsetDateTime::now_utc();
            fold.recent.extend(appended.iter().map(|a| Recent {
                causation: cause.id,
                source: cause.source.clone(),
                appended: a.clone(),
                stored_at: now,
            }));
        }
        let (entry, recent) = fold.entry();
        store.cache.put(&self.id, entry, recent);
    }

    fn clear(&mut self) {
        self.pending.clear();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The instances of one decision, in the order the caller named them.
#[doc(hidden)]
pub struct Parts {
    pub(super) parts: Vec<Box<dyn Part>>,
}

impl Parts {
    pub(super) fn new() -> Self {
        Self { parts: Vec::new() }
    }

    /// Adds instance `id` of `A`.
    pub(super) fn push<A: Aggregate>(&mut self, id: &str) {
        self.parts.push(Box::new(Slot::<A>::new(id)));
    }

    /// Instance `i`, an `A` (as pushed).
    pub(super) fn slot<A: Aggregate>(&self, i: usize) -> &Slot<A> {
        self.parts[i]
            .as_any()
            .downcast_ref()
            .expect("a part is of the type it was pushed as")
    }

    pub(super) fn slot_mut<A: Aggregate>(&mut self, i: usize) -> &mut Slot<A> {
        self.parts[i]
            .as_any_mut()
            .downcast_mut()
            .expect("a part is of the type it was pushed as")
    }

    /// A copy of instance `i`'s state.
    pub(super) fn state<A: Aggregate>(&self, i: usize) -> A {
        self.slot::<A>(i).fold.state.clone()
    }

    /// Instance `i`'s state, taken out.
    pub(super) fn take_state<A: Aggregate>(&mut self, i: usize) -> A {
        std::mem::take(&mut self.slot_mut::<A>(i).fold.state)
    }

    /// Gives instance `i` the decision's events for it.
    pub(super) fn stage<A: Aggregate>(&mut self, i: usize, events: Vec<A::Event>) {
        self.slot_mut::<A>(i).pending.extend(events);
    }

    /// The last sequence read of any of them.
    pub(super) fn version(&self) -> u64 {
        self.parts.iter().map(|p| p.version()).max().unwrap_or(0)
    }

    /// How many instances there are.
    pub(super) fn len(&self) -> usize {
        self.parts.len()
    }

    /// The filters of the instances of `A` among them, with their index.
    pub(super) fn filters_of<A: Aggregate>(&self) -> impl Iterator<Item = (usize, &str)> {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.key().0 == TypeId::of::<A>())
            .map(|(i, p)| (i, p.filter()))
    }

    /// The instances, as `Name/id+Name/id`: what a handler's decision on
    /// them derives its events' ids from.
    pub(super) fn path(&self) -> String {
        self.parts
            .iter()
            .map(|p| format!("{}/{}", p.name(), p.id()))
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The instances, as `Name id, Name id`.
    pub(super) fn names(&self) -> String {
        self.parts
            .iter()
            .map(|p| format!("{} {}", p.name(), p.id()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The stream every instance lives in, each set up.
    pub(super) async fn prepare(&self, store: &Aggregates) -> Result<&'static str, AggregateError> {
        let mut stream: Option<(&'static str, &dyn Part)> = None;
        for p in &self.parts {
            // Boxing the setup's future costs kilobytes: only when needed.
            let s = match p.prepared(store) {
                Some(s) => s,
                None => p.prepare(store).await?,
            };
            match stream {
                None => stream = Some((s, p.as_ref())),
                Some((first, q)) if first != s => {
                    return Err(AggregateError::new(
                        p.name(),
                        p.id(),
                        AggregateErrorKind::Stream,
                        format!(
                            "its events live in stream {s}, those of {} {} in {first}: one decision is one atomic batch, which is one stream",
                            q.name(),
                            q.id()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        stream.map(|(s, _)| s).ok_or_else(|| {
            AggregateError::new(
                "",
                "",
                AggregateErrorKind::Stream,
                "a decision on no aggregate",
            )
        })
    }

    /// Refuses an instance named twice.
    pub(super) fn check_distinct(&self) -> Result<(), AggregateError> {
        if self.parts.len() < 2 {
            return Ok(());
        }
        let mut seen = HashSet::new();
        for p in &self.parts {
            if !seen.insert(p.key()) {
                return Err(AggregateError::new(
                    p.name(),
                    p.id(),
                    AggregateErrorKind::Usage,
                    "named twice in one decision",
                ));
            }
        }
        Ok(())
    }
}
