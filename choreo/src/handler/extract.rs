//! A handler's arguments: the event ([`EventArg`]) and the extractors after
//! it ([`FromContext`]): [`Context`], [`State`], [`Metadata`], [`Attempt`].

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::{Context, HandlerError};
use crate::event::Event;
use crate::wire::envelope::Envelope;
use crate::wire::headers::Metadata;

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
/// [`Metadata`], [`Attempt`] or a `Decider` (aggregates).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "unsupported handler argument",
    note = "after the event, a handler takes `Context`, `State<T>`, `Metadata`, `Attempt` or `Decider`"
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
#[non_exhaustive]
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
