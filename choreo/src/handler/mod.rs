//! Handlers: the [`Handler`] trait that `#[event_handler]` implements, its
//! [options](HandlerOptions), its [arguments](FromContext) and
//! [`Context`], and its [errors](HandlerError).

use std::future::Future;
use std::pin::Pin;

mod context;
mod deadline;
mod error;
mod extract;
mod options;
#[cfg(feature = "test-util")]
pub(crate) mod testing;

pub use crate::publish::Emission;
pub(crate) use context::AfterEmit;
pub(crate) use context::Delivery;
pub use context::{Context, EmittedEvent};
pub use deadline::{Deadline, DeadlineHandler, MatchBy, Unless, UnlessVisitor};
pub use error::{HandlerError, HandlerErrorKind, IntoHandlerResult};
pub use extract::{Attempt, EventArg, FromContext, MissingState, State, States};
pub(crate) use options::placeholder_index;
pub use options::{DEFAULT_PARTITIONS, DEFAULT_TIMEOUT, DeliverPolicy, HandlerOptions, Ordered};

use crate::event::Event;
use crate::wire::envelope::Envelope;

/// A boxed, sendable future, as handlers return it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An async function that handles one event type. Write it with
/// [`#[event_handler]`](macro@crate::event_handler); implement it by hand only
/// for handlers built at run time.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a choreo handler",
    label = "not a handler",
    note = "annotate an `async fn` with `#[choreo::event_handler]` and pass its name"
)]
pub trait Handler: Send + Sync + 'static {
    /// The event it handles.
    type Event: Event;

    /// Whether it is a deadline handler: `#[event_handler(within = ..,
    /// unless = ..)]` sets it, and [`Service::handler`](crate::Service::handler)
    /// then refuses it at compile time (register it with
    /// [`Service::deadline`](crate::Service::deadline)).
    #[doc(hidden)]
    const DEADLINE: bool = false;

    /// The handler's name: unique within a service, a Rust identifier.
    fn name(&self) -> &'static str;

    /// How it consumes events.
    fn options(&self) -> HandlerOptions {
        HandlerOptions::default()
    }

    /// The event types it may emit, when it declares them
    /// (`#[event_handler(emits = [PaymentCaptured, PaymentDeclined])]`).
    /// Emitting another type then fails the handler permanently, naming the
    /// type and the declaration. `None` (the default): undeclared.
    fn emits(&self) -> Option<&'static [crate::event::EventType]> {
        None
    }

    /// The deadline it runs on, for a handler declared with
    /// `#[event_handler(within = .., unless = ..)]` (`None` by default).
    /// Such a handler is registered with
    /// [`Service::deadline`](crate::Service::deadline).
    fn deadline(&self) -> Option<Deadline> {
        None
    }

    /// For a consumer choreo runs as part of a deadline handler (its
    /// schedule step or a B watcher): that handler's name. Tools show it
    /// under its handler. `None` by default.
    #[doc(hidden)]
    fn part_of(&self) -> Option<&'static str> {
        None
    }

    /// Checks, at service start, that the state its arguments need exists.
    ///
    /// # Errors
    /// The type name of the first missing state.
    fn check(&self, states: &States) -> Result<(), MissingState> {
        let _ = states;
        Ok(())
    }

    /// Handles one event.
    fn call(
        &self,
        event: Envelope<Self::Event>,
        ctx: &Context,
    ) -> BoxFuture<Result<(), HandlerError>>;
}
