//! Fault hooks: where a fault test can stop the runtime mid-event. Not
//! part of the stable API (reached through `choreo::__private`).

use std::sync::Arc;

/// A step of handling one event at which a fault test can stop the runtime.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultPoint {
    /// The handler returned `Ok`; nothing was published yet.
    BeforeEmit,
    /// The first emitted event is acknowledged, the others are not sent.
    BetweenEmits,
    /// Every emission is acknowledged; the inbox record is not written.
    AfterEmit,
    /// The inbox record is written; the event is not acked.
    AfterRecord,
    /// An ordered handler's new holder of a partition is about to read what
    /// the last holder left (the event id is the arriving event's):
    /// returning `true` makes that read fail.
    TakeOverRead,
}

/// Called at each [`FaultPoint`] with the handled event's id; returning
/// `true` stops handling that event right there, with no verdict, as a crash
/// would. For fault tests only: not part of the stable API.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(FaultPoint, crate::event::EventId) -> bool + Send + Sync>;
