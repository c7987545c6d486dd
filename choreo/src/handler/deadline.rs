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

/// A declared deadline: after the handler's event A, an event of one of
/// the `unless` types matched by `matched_by` must follow within `within`,
/// or the handler runs with A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deadline {
    /// How long after A's time (`ce-time`) B may arrive.
    pub within: Duration,
    /// The types of B: the first of any of them to arrive cancels it.
    pub unless: &'static [EventType],
    /// How B is matched to A.
    pub matched_by: MatchBy,
    /// The name of the consumer part that schedules (`<handler>__schedule`).
    pub(crate) schedule: &'static str,
    /// The names of the consumer parts that watch for each B
    /// (`<handler>__met_<B>`), in the order of `unless`.
    pub(crate) met: &'static [&'static str],
}

impl Deadline {
    /// A deadline; `schedule` and `met` name its helper consumers
    /// (`<handler>__schedule`, `<handler>__met_<B>` per B). The macro calls
    /// this.
    #[doc(hidden)]
    pub const fn new(
        within_ms: u64,
        unless: &'static [EventType],
        matched_by: MatchBy,
        schedule: &'static str,
        met: &'static [&'static str],
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
    /// The events that, arriving in time, cancel the deadline: a tuple of
    /// one to four event types, `(PaymentCaptured, PaymentDeclined)`.
    type Unless: Unless;
}

/// The event types a deadline waits for: a tuple of one to four [`Event`]
/// types (what `unless = [A, B]` makes).
pub trait Unless: 'static {
    /// Calls `visit` with each type and its index.
    fn each(visit: &mut impl UnlessVisitor);
}

/// Called once per type of an [`Unless`] tuple.
pub trait UnlessVisitor {
    /// One of the types, the `index`-th.
    fn visit<B: Event>(&mut self, index: usize);
}

macro_rules! unless_tuple {
    ($($b:ident $i:tt),+) => {
        impl<$($b: Event),+> Unless for ($($b,)+) {
            fn each(visit: &mut impl UnlessVisitor) {
                $( visit.visit::<$b>($i); )+
            }
        }
    };
}
unless_tuple!(B0 0);
unless_tuple!(B0 0, B1 1);
unless_tuple!(B0 0, B1 1, B2 2);
unless_tuple!(B0 0, B1 1, B2 2, B3 3);
