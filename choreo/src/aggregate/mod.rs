//! Event-sourced aggregates in JetStream: an entity's state is the fold of
//! its own events, and a decision appends new events only if nobody
//! appended since the state was read.
//!
//! - An aggregate's events are ordinary [`Event`]s whose
//!   subjects carry the aggregate's id (`stock.{sku}.reserved`), gathered in
//!   an enum that derives [`AggregateEvent`]. What a decision appends is a
//!   choreography event like any other: other services' handlers react to
//!   it.
//! - [`Aggregate`] is the state: `apply` folds one event in, and
//!   [`Aggregate::filter`] names the subjects of one instance, the boundary
//!   every decision on it checks.
//! - [`Aggregates`] loads a state with batched direct gets (no consumer per
//!   load) and [`decides`](Aggregates::decide): it runs the decision on the
//!   state and appends its events with
//!   `Nats-Expected-Last-Subject-Sequence` against the boundary's filter,
//!   several events as one atomic batch. On a conflict it loads again and
//!   decides again, up to [`Aggregates::attempts`] times.
//! - In a handler, [`Decider`] decides with the handled event as cause: the
//!   appended events carry its correlation and causation ids and ids
//!   derived from it, and a redelivered event whose decision was already
//!   appended finds it in the history instead of deciding twice.
//!
//! See `docs/aggregates.md`.

use crate::event::{DecodeError, Event, EventType};

mod across;
mod append;
mod cache;
mod decider;
mod decision;
mod encode;
mod error;
mod fold;
pub mod inspect;
mod parts;
mod prepare;
pub(crate) mod read;
pub mod snapshot;
mod store;
pub mod testing;

pub use across::Boundaries;
pub use cache::DEFAULT_CACHE_CAPACITY;
pub use decider::Decider;
pub use error::{AggregateError, AggregateErrorKind, DecideError};
pub use snapshot::SnapshotPolicy;
pub use store::{Aggregates, Appended, At, DEFAULT_ATTEMPTS, Decided, Loaded, Recorded};

/// The state of an aggregate: the fold of its events.
///
/// ```
/// use choreo::{event, Aggregate, AggregateEvent};
///
/// #[event(subject = "stock.{sku}.received")]
/// pub struct StockReceived { pub sku: String, pub qty: u32 }
/// #[event(subject = "stock.{sku}.reserved")]
/// pub struct StockReserved { pub sku: String, pub order_id: String, pub qty: u32 }
///
/// #[derive(AggregateEvent)]
/// pub enum StockEvent {
///     Received(StockReceived),
///     Reserved(StockReserved),
/// }
///
/// #[derive(Default, Clone)]
/// pub struct Stock { pub on_hand: u32 }
///
/// impl Aggregate for Stock {
///     const NAME: &'static str = "Stock";
///     type Event = StockEvent;
///     fn filter(sku: &str) -> String {
///         format!("stock.{sku}.*")
///     }
///     fn apply(&mut self, event: &StockEvent) {
///         match event {
///             StockEvent::Received(e) => self.on_hand += e.qty,
///             StockEvent::Reserved(e) => self.on_hand -= e.qty,
///         }
///     }
/// }
/// ```
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// The aggregate's name, in errors and logs (e.g. `Stock`).
    const NAME: &'static str;
    /// The events of its history.
    type Event: AggregateEvent;
    /// The subject filter that covers every event of the instance `id` and
    /// nothing else, e.g. `stock.{id}.*`. It is the boundary a decision
    /// checks, and every writer must use this one string: on a replicated
    /// stream, a check sees a write still in flight only when both used the
    /// same filter (`docs/aggregates.md`).
    fn filter(id: &str) -> String;
    /// Folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// The state as bytes for a snapshot, restored by
    /// [`restore`](Self::restore); `None` (the default) keeps this
    /// aggregate out of snapshots. With `serde`:
    /// `snapshot::to_cbor(self)`.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }

    /// The state from [`snapshot`](Self::snapshot)'s bytes; `None` when
    /// they cannot be read (the load then reads the whole history). With
    /// `serde`: `snapshot::from_cbor(bytes)`.
    fn restore(bytes: &[u8]) -> Option<Self> {
        let _ = bytes;
        None
    }

    /// The version of the state's meaning, part of its snapshots' key:
    /// raise it when what a field means changes while its name and type
    /// stay, so old snapshots are not read. (A change of a field's name or
    /// type changes the key by itself.)
    const SHAPE_VERSION: u32 = 1;
}

/// The events of an aggregate's history: an enum whose variants each hold
/// one event type, with `#[derive(AggregateEvent)]`. Every type must live in
/// the same stream.
pub trait AggregateEvent: Sized + Send + Sync + 'static {
    /// The event types, one per variant.
    const TYPES: &'static [EventType];
    /// Decodes a stored event of type `name` written with schema `version`
    /// (through the type's `upcast_from` chain); `None` when `name` is not
    /// one of [`TYPES`](Self::TYPES).
    fn decode(name: &str, version: u32, payload: &[u8]) -> Option<Result<Self, DecodeError>>;
    /// Calls `visitor` with the event inside.
    fn visit<V: EventVisitor>(&self, visitor: &mut V) -> V::Output;
}

/// Something done with the event inside an [`AggregateEvent`], whatever its
/// type (choreo encodes it so).
pub trait EventVisitor {
    /// What a visit gives.
    type Output;
    /// Visits the event.
    fn visit<E: Event>(&mut self, event: &E) -> Self::Output;
}

/// Makes an enum of event types an aggregate's history (see
/// [`AggregateEvent`]).
pub use choreo_macros::AggregateEvent;
