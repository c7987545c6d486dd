//! Unit-testing handlers without a server (feature `test-util`).

use super::{Context, Delivery, EmittedEvent, Handler, HandlerError, States};
use crate::event::Event;
use crate::wire::envelope::Envelope;
use crate::wire::headers::Metadata;

/// Runs one handler on one event in a unit test, with no server: give it
/// the service's states once, call it, then read what it emitted as typed
/// values.
///
/// ```
/// use choreo::testing::HandlerTest;
/// use choreo::{event, event_handler, Context, State};
///
/// #[event(subject = "rooms.{booking}.requested", key = booking)]
/// pub struct RoomRequested { pub booking: String }
///
/// #[event(subject = "rooms.{booking}.reserved", key = booking)]
/// #[derive(Debug, PartialEq)]
/// pub struct RoomReserved { pub booking: String, pub floor: u8 }
///
/// #[derive(Clone)]
/// struct Hotel { floor: u8 }
///
/// #[event_handler]
/// async fn reserve(r: RoomRequested, ctx: Context, State(hotel): State<Hotel>) {
///     ctx.emit(RoomReserved { booking: r.booking, floor: hotel.floor });
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let run = HandlerTest::new("rooms")
///     .state(Hotel { floor: 3 })
///     .call(reserve, RoomRequested { booking: "b-1".into() })
///     .await;
/// assert!(run.result.is_ok());
/// assert_eq!(run.emitted::<RoomReserved>(), vec![RoomReserved { booking: "b-1".into(), floor: 3 }]);
/// # });
/// ```
#[derive(Debug)]
pub struct HandlerTest {
    service: String,
    states: States,
    attempt: u32,
}

impl HandlerTest {
    /// A test of a handler of service `service` (the `ce-source` of what it
    /// emits, and part of its emitted ids).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            states: States::default(),
            attempt: 1,
        }
    }

    /// Adds a state the handler takes as [`State<T>`](crate::State).
    #[must_use]
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// The delivery attempt the handler sees (default 1).
    #[must_use]
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Calls `handler` on `event`, as a root event published by `test`.
    ///
    /// # Panics
    /// The event's subject or headers cannot be built (a bad field value):
    /// the same event could not be published either.
    pub async fn call<H: Handler>(&self, handler: H, event: H::Event) -> TestRun {
        let meta = match Metadata::root(&event, "test") {
            Ok(m) => m,
            Err(e) => panic!("{} cannot be an event: {e}", H::Event::NAME),
        };
        self.call_with(handler, event, meta).await
    }

    /// Calls `handler` on `event` with the given metadata (to test how it
    /// treats a correlation id, or a redelivery).
    ///
    /// # Panics
    /// The event's subject cannot be rendered.
    pub async fn call_with<H: Handler>(
        &self,
        handler: H,
        event: H::Event,
        meta: Metadata,
    ) -> TestRun {
        let envelope = match Envelope::new(event, meta.clone()) {
            Ok(e) => e,
            Err(e) => panic!("{} cannot be an event: {e}", H::Event::NAME),
        };
        let ctx = Context::new(
            meta,
            Delivery {
                subject: envelope.subject().to_owned(),
                attempt: self.attempt,
                stream_sequence: 0,
                stored_at: None,
                replay: false,
            },
            std::sync::Arc::from(self.service.as_str()),
            handler.name(),
            std::sync::Arc::from(format!("{}.{}", self.service, handler.name())),
            std::sync::Arc::new(self.states.clone()),
            handler.emits(),
        );
        let result = match handler.check(&self.states) {
            Ok(()) => handler.call(envelope, &ctx).await,
            Err(missing) => Err(HandlerError::permanent(missing)),
        };
        // As on a server: a handler that returns `Ok` with an emission that
        // cannot be published (an undeclared type, a bad subject) fails
        // permanently, and its event is dead-lettered `emit-failed`.
        let result = match (result, ctx.emit_failure()) {
            (Ok(()), Some(e)) => Err(HandlerError::permanent(format!("emit-failed: {e}"))),
            (result, _) => result,
        };
        TestRun { result, ctx }
    }
}

/// What one [`HandlerTest::call`] did. `result` is the verdict the runtime
/// would act on: a handler that returns `Ok` but emitted what it cannot
/// publish (a type its `emits` does not declare, a bad subject) has a
/// permanent error here, `emit-failed: …`, as a server dead-letters its
/// event with reason `emit-failed`.
#[derive(Debug)]
#[non_exhaustive]
pub struct TestRun {
    /// The handler's verdict.
    pub result: Result<(), HandlerError>,
    ctx: Context,
}

impl TestRun {
    /// The events of type `E` it emitted, in order.
    pub fn emitted<E: Event>(&self) -> Vec<E> {
        self.ctx.emitted::<E>()
    }

    /// Every event it emitted, with its id and subject.
    pub fn emitted_events(&self) -> Vec<EmittedEvent> {
        self.ctx.take_emitted()
    }

    /// The context the handler saw.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}
