//! [`Deadline`]: "B within T of A, or else", as `#[event_handler(within =
//! "15m", unless = B)]` declares it; [`DeadlineHandler`], what the macro
//! implements for such a handler.

use std::time::Duration;

use super::Handler;
use crate::event::{Event, EventType};

/// How an event B is matched to the event A that started a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MatchBy {
    /// B carries A's correlation id: it belongs to the same flow (the
    /// default, `matched_by = correlation`).
    Correlation,
    /// B's `key` equals A's (`matched_by = key`): both event types declare
    /// a `key`, with the same values for the same business thing.
    Key,
}

/// A declared deadline: after the handler's event A, an event of type
/// `unless` matched by `matched_by` must follow within `within`, or the
/// handler runs with A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deadline {
    /// How long after A's time (`ce-time`) B may arrive.
    pub within: Duration,
    /// B's type.
    pub unless: EventType,
    /// How B is matched to A.
    pub matched_by: MatchBy,
    /// The name of the consumer part that schedules (`<handler>__schedule`).
    pub(crate) schedule: &'static str,
    /// The name of the consumer part that watches for B (`<handler>__met`).
    pub(crate) met: &'static str,
}

impl Deadline {
    /// A deadline; `schedule` and `met` name its two helper consumers
    /// (`<handler>__schedule`, `<handler>__met`). The macro calls this.
    #[doc(hidden)]
    pub const fn new(
        within_ms: u64,
        unless: EventType,
        matched_by: MatchBy,
        schedule: &'static str,
        met: &'static str,
    ) -> Self {
        Self {
            within: Duration::from_millis(within_ms),
            unless,
            matched_by,
            schedule,
            met,
        }
    }
}

/// A handler that runs when a deadline passes: its event is the A that
/// started the deadline, and [`Unless`](Self::Unless) the B that cancels
/// it. `#[event_handler(within = "15m", unless = PaymentCaptured)]`
/// implements it; register it with
/// [`Service::deadline`](crate::Service::deadline).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a deadline handler",
    label = "not a deadline handler",
    note = "give the handler `#[event_handler(within = \"15m\", unless = SomeEvent)]`, or register it with `Service::handler`"
)]
pub trait DeadlineHandler: Handler {
    /// The event that, arriving in time, cancels the deadline.
    type Unless: Event;
}
