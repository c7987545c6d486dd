//! Handlers: the [`Handler`] trait that `#[event_handler]` implements, its
//! options, its arguments (extractors) and its errors.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::context::Context;
use crate::envelope::Envelope;
use crate::event::Event;
use crate::headers::Metadata;

/// A boxed, sendable future, as handlers return it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a new durable consumer starts reading its stream. Applies only when
/// the consumer is created; an existing durable keeps its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliverPolicy {
    /// Every event still in the stream (the default): nothing published
    /// before the service's first start is missed.
    All,
    /// Only events published after the consumer is created.
    New,
    /// Events published at or after this time.
    Since(OffsetDateTime),
}

/// The default [`HandlerOptions::timeout`]: 5 minutes, long enough for any
/// handler that is making progress, short enough that a hung one frees its
/// event within one deploy's patience.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How one handler consumes its events. `#[event_handler(...)]` sets these;
/// every field has a default.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerOptions {
    /// Events handled at once by one service instance. Default 256: handlers
    /// mostly wait on I/O, and JetStream needs many acks in flight to be fast.
    pub concurrency: usize,
    /// Deliveries before an event goes to the dead-letter stream. Default 5;
    /// never unlimited.
    pub max_deliver: u32,
    /// Delay before redelivery after the n-th failed attempt (the last entry
    /// repeats). Default 1 s, 5 s, 30 s.
    pub backoff: Vec<Duration>,
    /// How long JetStream waits for a verdict before redelivering. Running
    /// handlers send in-progress acks, so this bounds silence, not handler
    /// time. Default 30 s.
    pub ack_wait: Duration,
    /// How long one invocation may run before it is abandoned: its future
    /// is dropped, in-progress acks stop, and the attempt counts as a
    /// retryable failure (on the last allowed delivery the event is
    /// dead-lettered with reason `timeout`). Default 5 minutes. A handler
    /// that blocks its thread cannot be dropped; its in-progress acks still
    /// stop, so JetStream redelivers the event elsewhere after `ack_wait`.
    pub timeout: Duration,
    /// Where a new consumer starts. Default [`DeliverPolicy::All`].
    pub deliver: DeliverPolicy,
    /// Whether the service's inbox skips events this handler already
    /// handled. Default on.
    pub idempotent: bool,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ack_wait: Duration::from_secs(30),
            timeout: DEFAULT_TIMEOUT,
            deliver: DeliverPolicy::All,
            idempotent: true,
        }
    }
}

impl HandlerOptions {
    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
    /// Sets [`max_deliver`](Self::max_deliver).
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = n;
        self
    }
    /// Sets [`backoff`](Self::backoff).
    pub fn backoff(mut self, delays: Vec<Duration>) -> Self {
        self.backoff = delays;
        self
    }
    /// Sets [`ack_wait`](Self::ack_wait).
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }
    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Sets [`deliver`](Self::deliver).
    pub fn deliver(mut self, d: DeliverPolicy) -> Self {
        self.deliver = d;
        self
    }
    /// Sets [`idempotent`](Self::idempotent).
    pub fn idempotent(mut self, on: bool) -> Self {
        self.idempotent = on;
        self
    }

    /// The redelivery delay after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

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

    /// The handler's name: unique within a service, a Rust identifier.
    fn name(&self) -> &'static str;

    /// How it consumes events.
    fn options(&self) -> HandlerOptions {
        HandlerOptions::default()
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

/// Why a handler failed, and whether trying again can help.
///
/// `?` on any `std::error::Error` gives a retryable error; say
/// [`HandlerError::permanent`] when a retry cannot succeed (the event is then
/// dead-lettered at once).
pub struct HandlerError {
    permanent: bool,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// A failure that may succeed later: the event is redelivered after the
    /// handler's backoff, up to `max_deliver` times.
    pub fn retryable(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            permanent: false,
            source: e.into(),
        }
    }

    /// A failure no retry can fix: the event goes to the dead-letter stream
    /// at once.
    pub fn permanent(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self {
            permanent: true,
            source: e.into(),
        }
    }

    /// Whether this error is permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::retryable(e)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.permanent {
            "permanent"
        } else {
            "retryable"
        };
        write!(f, "{kind} error: {}", self.source)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("source", &self.source)
            .finish()
    }
}

/// What a handler may return: `()` or `Result<(), E>` with `E` convertible
/// into [`HandlerError`].
#[diagnostic::on_unimplemented(
    message = "a choreo handler must return `()` or `Result<(), E>` where `E: Into<HandlerError>`, not `{Self}`",
    label = "unsupported return type",
    note = "events are facts: handlers emit new events with `ctx.emit(...)` instead of returning values"
)]
pub trait IntoHandlerResult {
    /// Converts into the handler's verdict.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

/// The first argument of a handler: the event itself, or its
/// [`Envelope`] to see its metadata too.
#[diagnostic::on_unimplemented(
    message = "the first argument of a handler must be an event type or `Envelope<Event>`, not `{Self}`",
    label = "not an event",
    note = "event types are declared with `#[choreo::event(...)]`"
)]
pub trait EventArg: Sized + Send + 'static {
    /// The event type.
    type Event: Event;
    /// Takes the argument out of the envelope.
    fn from_envelope(envelope: Envelope<Self::Event>) -> Self;
}

impl<E: Event> EventArg for E {
    type Event = E;
    fn from_envelope(envelope: Envelope<E>) -> Self {
        envelope.into_event()
    }
}

impl<E: Event> EventArg for Envelope<E> {
    type Event = E;
    fn from_envelope(envelope: Envelope<E>) -> Self {
        envelope
    }
}

/// A handler argument after the event: [`Context`], [`State<T>`],
/// [`Metadata`] or [`Attempt`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "unsupported handler argument",
    note = "after the event, a handler takes `Context`, `State<T>`, `Metadata` or `Attempt`"
)]
pub trait FromContext: Sized + Send + 'static {
    /// Extracts the argument for one invocation.
    ///
    /// # Errors
    /// A required state is missing (normally caught by [`check`](Self::check) at start).
    fn from_context(ctx: &Context) -> Result<Self, HandlerError>;

    /// Checks at service start that the argument can be extracted.
    ///
    /// # Errors
    /// The missing state.
    fn check(states: &States) -> Result<(), MissingState> {
        let _ = states;
        Ok(())
    }
}

impl FromContext for Context {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(ctx.clone())
    }
}

impl FromContext for Metadata {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(ctx.meta().clone())
    }
}

/// The delivery attempt of the event being handled, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attempt(pub u32);

impl FromContext for Attempt {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        Ok(Self(ctx.attempt()))
    }
}

/// Shared state registered with [`Service::state`](crate::Service::state),
/// cloned into each invocation (put an `Arc` inside for large state).
#[derive(Clone, Copy, Debug, Default)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromContext for State<T> {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        ctx.states()
            .get::<T>()
            .map(State)
            .ok_or_else(|| HandlerError::permanent(MissingState::of::<T>()))
    }

    fn check(states: &States) -> Result<(), MissingState> {
        if states.contains::<T>() {
            Ok(())
        } else {
            Err(MissingState::of::<T>())
        }
    }
}

/// A handler needs a state that the service does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no state of type `{type_name}`: register it with `Service::state(value)`")]
pub struct MissingState {
    /// The missing type.
    pub type_name: &'static str,
}

impl MissingState {
    /// The error for type `T`.
    pub fn of<T>() -> Self {
        Self {
            type_name: std::any::type_name::<T>(),
        }
    }
}

/// The states of a service, one value per type.
#[derive(Clone, Default)]
pub struct States {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl States {
    /// Stores `value`, replacing any of the same type.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Arc::new(value));
    }
    /// A clone of the value of type `T`.
    pub fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        self.map
            .get(&TypeId::of::<T>())?
            .downcast_ref::<T>()
            .cloned()
    }
    /// Whether a value of type `T` is stored.
    pub fn contains<T: 'static>(&self) -> bool {
        self.map.contains_key(&TypeId::of::<T>())
    }
}

impl fmt::Debug for States {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("States")
            .field("len", &self.map.len())
            .finish()
    }
}
