//! [`Context`]: what a handler knows about the event it handles, and where it
//! emits new events.

use std::sync::{Arc, Mutex};

use super::error::HandlerError;
use super::{BoxFuture, States};
use crate::event::id::EmitCounts;
use crate::event::{Event, EventId, EventType};
use crate::publish::{Emission, Outgoing, PublishError};
use crate::wire::headers::Metadata;

/// The handled event's metadata and delivery, the service's state, and the
/// buffer of events the handler emits.
///
/// Events passed to [`emit`](Self::emit) are published only after the
/// handler returns `Ok`, each awaited until JetStream acknowledges it, and
/// only then is the handled event acknowledged. They carry the flow's
/// correlation id, the handled event's id as causation id, and deterministic
/// ids, so a redelivered handler re-emits the very same events and JetStream
/// drops the repeats.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    meta: Metadata,
    subject: String,
    attempt: u32,
    stream_sequence: u64,
    stored_at: Option<time::OffsetDateTime>,
    replay: bool,
    service: Arc<str>,
    handler: &'static str,
    handler_id: Arc<str>,
    states: Arc<States>,
    /// What the handler declares it emits (`None`: undeclared).
    emits: Option<&'static [EventType]>,
    emitted: Mutex<Emitted>,
    /// The delivery is done with, but the event is not handled: ack it
    /// without an inbox record (a deadline's fired copy put off).
    put_off: std::sync::atomic::AtomicBool,
}

/// Work to do once a handler's emissions are stored (see
/// [`Context::after_emit`]).
pub(crate) type AfterEmit = Box<dyn FnOnce() -> BoxFuture<()> + Send>;

#[derive(Default)]
struct Emitted {
    sealed: bool,
    counts: EmitCounts,
    out: Vec<Result<Outgoing, PublishError>>,
    /// Run once the emissions are stored, before the ack.
    after_emit: Vec<AfterEmit>,
}

/// The parts of a [`Context`] that come from the delivery.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) subject: String,
    pub(crate) attempt: u32,
    pub(crate) stream_sequence: u64,
    /// When the server stored the event (its stream timestamp).
    pub(crate) stored_at: Option<time::OffsetDateTime>,
    /// Delivered again by `choreo replay` (`admin::replay`).
    pub(crate) replay: bool,
}

impl Context {
    pub(crate) fn new(
        meta: Metadata,
        delivery: Delivery,
        service: Arc<str>,
        handler: &'static str,
        handler_id: Arc<str>,
        states: Arc<States>,
        emits: Option<&'static [EventType]>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                meta,
                subject: delivery.subject,
                attempt: delivery.attempt,
                stream_sequence: delivery.stream_sequence,
                stored_at: delivery.stored_at,
                replay: delivery.replay,
                service,
                handler,
                handler_id,
                states,
                emits,
                emitted: Mutex::new(Emitted::default()),
                put_off: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// A context for calling a handler function directly in a unit test,
    /// without a server: `service` and `handler` name the handler, `meta` is
    /// the handled event's metadata, and `states` its service's state.
    /// [`emitted`](Self::emitted) then shows what it emitted. With a
    /// handler that takes [`State`](crate::State), prefer
    /// [`HandlerTest`](crate::testing::HandlerTest), which is given each
    /// state once. Needs the `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn for_test(service: &str, handler: &'static str, meta: Metadata, states: States) -> Self {
        let delivery = Delivery {
            subject: String::new(),
            attempt: 1,
            stream_sequence: 0,
            stored_at: None,
            replay: false,
        };
        Self::new(
            meta,
            delivery,
            Arc::from(service),
            handler,
            Arc::from(format!("{service}.{handler}")),
            Arc::new(states),
            None,
        )
    }

    /// The handled event's metadata.
    pub fn meta(&self) -> &Metadata {
        &self.inner.meta
    }
    /// The handled event's id.
    pub fn event_id(&self) -> EventId {
        self.inner.meta.id()
    }
    /// The flow's correlation id.
    pub fn correlation_id(&self) -> EventId {
        self.inner.meta.correlation_id()
    }
    /// The handled event's causation id (`None` for a root event).
    pub fn causation_id(&self) -> Option<EventId> {
        self.inner.meta.causation_id()
    }
    /// The subject the event arrived on.
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }
    /// The delivery attempt, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }
    /// The event's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.inner.stream_sequence
    }
    /// When the server stored the event: its stream timestamp, by the
    /// server's clock (`ce-time` is the emitter's). `None` in a unit test
    /// without a server. Deadlines judge "B within T of A" by it
    /// (`docs/deadlines.md`).
    pub fn stored_at(&self) -> Option<time::OffsetDateTime> {
        self.inner.stored_at
    }
    /// Whether this delivery comes from a replay of the handler
    /// (`choreo replay`, or `choreo::admin::replay`): the
    /// event is in the replayed range. A handler that sends mail may skip
    /// it when the replay rebuilds a read model (`--rerun`).
    pub fn is_replay(&self) -> bool {
        self.inner.replay
    }
    /// The service's name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }
    /// The handler's name.
    pub fn handler(&self) -> &'static str {
        self.inner.handler
    }
    /// The handler id, `<service>.<handler>`, as used in emitted event ids.
    pub fn handler_id(&self) -> &str {
        &self.inner.handler_id
    }

    /// A stable key for this handler's side effects on this event:
    /// `<service>.<handler>:<event id>`. It is the same on every redelivery, so
    /// a payment provider or database can use it to do the effect once.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.inner.handler_id, self.inner.meta.id())
    }

    pub(crate) fn states(&self) -> &States {
        &self.inner.states
    }

    /// Marks the delivery as put off: the handler returns `Ok` having done
    /// nothing, and a later copy of the same event (a deadline's fired
    /// copy, scheduled again) must still run. The runtime acks it without
    /// recording it in the inbox.
    pub(crate) fn put_off(&self) {
        self.inner
            .put_off
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`put_off`](Self::put_off) was called.
    pub(crate) fn is_put_off(&self) -> bool {
        self.inner
            .put_off
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Emits `event` once the handler returns `Ok`. Its id is deterministic:
    /// the `key` rule if the type has a key, else the `index`-th emission of
    /// this event name in this invocation. A subject or encoding error makes
    /// the handler's outcome a permanent failure (the handled event goes to
    /// the dead-letter stream) rather than a silently dropped event.
    pub fn emit<E: Event>(&self, event: E) {
        let mut emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        if emitted.sealed {
            tracing::error!(
                event = E::NAME,
                handler = %self.inner.handler_id,
                "emit() after the handler returned is ignored: emit before returning"
            );
            return;
        }
        if let Some(declared) = self.inner.emits
            && !declared.iter().any(|t| t.name == E::NAME)
        {
            emitted.out.push(Err(PublishError::Undeclared {
                event: E::NAME,
                handler: self.inner.handler_id.to_string(),
                declared: declared.iter().map(|t| t.name).collect(),
            }));
            return;
        }
        let index = emitted.counts.next(E::NAME);
        let out = Metadata::emitted(
            &event,
            &self.inner.service,
            &self.inner.meta,
            &self.inner.handler_id,
            index,
        )
        .map_err(PublishError::from)
        .and_then(|meta| Outgoing::new(&event, meta));
        emitted.out.push(out);
    }

    /// The events of type `E` emitted so far, decoded back from what would
    /// be published, in emission order. Needs the `test-util` feature.
    ///
    /// # Panics
    /// An emitted payload does not decode as `E` (a bug in its serde impl).
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn emitted<E: Event>(&self) -> Vec<E> {
        let emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        emitted
            .out
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .filter(|o| o.event == E::NAME)
            .map(|o| match E::decode_payload(E::VERSION, &o.payload) {
                Ok(e) => e,
                Err(err) => panic!("an emitted {} does not decode: {err}", E::NAME),
            })
            .collect()
    }

    /// Takes the emitted events (with their ids and subjects) and refuses
    /// later emissions, as the runtime does after the handler returns.
    /// Needs the `test-util` feature.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn take_emitted(&self) -> Vec<EmittedEvent> {
        self.take_outgoing()
            .into_iter()
            .map(|o| match o {
                Ok(o) => EmittedEvent {
                    event_type: o.event,
                    id: Some(o.id),
                    subject: o.subject,
                    error: None,
                },
                Err(e) => EmittedEvent {
                    event_type: "",
                    id: None,
                    subject: String::new(),
                    error: Some(e.to_string()),
                },
            })
            .collect()
    }

    /// The first emission that could not be built (an undeclared type, a
    /// bad subject), as the runtime would dead-letter it (`emit-failed`).
    #[cfg(feature = "test-util")]
    pub(crate) fn emit_failure(&self) -> Option<String> {
        let emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        emitted
            .out
            .iter()
            .find_map(|o| o.as_ref().err().map(ToString::to_string))
    }

    /// The events emitted so far, encoded as they will be published once
    /// the handler returns `Ok`: for a transactional outbox to store them in
    /// the same database transaction as the handler's effects (the
    /// `choreo-postgres` crate does). They are still published as usual.
    ///
    /// # Errors
    /// An emission that could not be built (a type the handler's `emits`
    /// does not declare, a bad subject): the error the handler is
    /// dead-lettered with, permanent.
    pub fn emissions(&self) -> Result<Vec<Emission>, HandlerError> {
        let emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        emitted
            .out
            .iter()
            .map(|o| match o {
                Ok(o) => Ok(Emission {
                    event_id: o.id,
                    event_type: o.event,
                    stream: o.stream.name,
                    subject: o.subject.clone(),
                    headers: o.headers.clone(),
                    payload: o.payload.clone(),
                }),
                Err(e) => Err(HandlerError::permanent(format!("emit-failed: {e}"))),
            })
            .collect()
    }

    /// Runs `hook` once this handler's emissions are stored in their
    /// streams, before the handled event is acknowledged; not when the
    /// handler fails or the publish does. A transactional outbox deletes
    /// the rows it published this way (a process that dies first leaves
    /// them to the outbox's relay).
    pub fn after_emit<F>(&self, hook: F)
    where
        F: FnOnce() -> BoxFuture<()> + Send + 'static,
    {
        self.inner
            .emitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .after_emit
            .push(Box::new(hook));
    }

    /// The hooks [`after_emit`](Self::after_emit) registered.
    pub(crate) fn take_after_emit(&self) -> Vec<AfterEmit> {
        let mut emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut emitted.after_emit)
    }

    pub(crate) fn take_outgoing(&self) -> Vec<Result<Outgoing, PublishError>> {
        let mut emitted = self.inner.emitted.lock().unwrap_or_else(|p| p.into_inner());
        emitted.sealed = true;
        let mut out = std::mem::take(&mut emitted.out);
        // A copy stored again past the duplicate window says it is one.
        if self.is_replay() {
            for o in out.iter_mut().flatten() {
                o.headers.insert(
                    crate::wire::headers::CHOREO_REPLAY,
                    self.inner.handler_id.as_ref(),
                );
                o.replay = Some(self.inner.handler_id.clone());
            }
        }
        out
    }
}

/// One event a handler emitted, as `Context::take_emitted` (feature
/// `test-util`) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmittedEvent {
    /// The event's name (empty if it could not be built).
    pub event_type: &'static str,
    /// Its id (none if it could not be built).
    pub id: Option<EventId>,
    /// Its subject.
    pub subject: String,
    /// Why it could not be built, if it could not.
    pub error: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("handler", &self.inner.handler_id)
            .field("event_id", &self.inner.meta.id())
            .field("attempt", &self.inner.attempt)
            .finish_non_exhaustive()
    }
}
