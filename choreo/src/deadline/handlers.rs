//! The three consumers one deadline handler runs as:
//!
//! - [`Schedule`] on A's stream (`<handler>__schedule`): schedules A's copy
//!   for A's time + T, unless the deadline is decided already.
//! - [`Met`] on each B's stream (`<handler>__met_<B>`): decides "met" for B's token
//!   and purges the schedule.
//! - [`Fire`] on the deadline stream (the handler's own name): decides
//!   "fired" for the fired copy and, if that write won, runs the handler.
//!
//! Each is an ordinary handler to the runtime, with its retries, dead
//! letters, tracing and metrics.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::{DECISION_KEEP, Outcome, Store, token};
use crate::event::Event;
use crate::handler::{
    BoxFuture, Context, Deadline, DeadlineHandler, DeliverPolicy, Handler, HandlerError,
    HandlerOptions, MatchBy,
};
use crate::wire::envelope::Envelope;

/// How the helper consumers retry: their work is a write or two to the
/// server, which fails only while it is unavailable, and giving up loses a
/// deadline (or its cancel), so they retry for about 50 minutes.
fn helper_options() -> HandlerOptions {
    HandlerOptions::default()
        .idempotent(false)
        .max_deliver(100)
        .deliver(DeliverPolicy::New)
}

fn store(ctx: &Context) -> Result<Store, HandlerError> {
    ctx.states().get::<Store>().ok_or_else(|| {
        HandlerError::permanent("the service has no deadline store (a bug in choreo)")
    })
}

fn retry(e: crate::nats::Source) -> HandlerError {
    HandlerError::retryable(e.to_string())
}

/// The token an event matches by: its flow's correlation id or its key.
fn token_of<E: Event>(by: MatchBy, event: &E, ctx: &Context) -> Result<String, HandlerError> {
    match by {
        MatchBy::Correlation => Ok(ctx.correlation_id().to_string()),
        MatchBy::Key => match event.key() {
            Some(k) => Ok(token(k.parts())),
            None => Err(HandlerError::permanent(format!(
                "{} has no key to match a deadline by",
                E::NAME
            ))),
        },
    }
}

/// How long an outcome is kept: past the deadline's time, an hour.
fn keep(d: &Deadline) -> Duration {
    d.within + DECISION_KEEP
}

/// Schedules A's copy when A is handled.
pub(crate) struct Schedule<H> {
    handler: &'static str,
    deadline: Deadline,
    _h: PhantomData<fn() -> H>,
}

impl<H: DeadlineHandler> Schedule<H> {
    pub(crate) fn new(handler: &'static str, deadline: Deadline) -> Self {
        Self {
            handler,
            deadline,
            _h: PhantomData,
        }
    }
}

impl<H: DeadlineHandler> Handler for Schedule<H> {
    type Event = H::Event;

    fn name(&self) -> &'static str {
        self.deadline.schedule
    }

    fn options(&self) -> HandlerOptions {
        helper_options()
    }

    fn call(
        &self,
        event: Envelope<Self::Event>,
        ctx: &Context,
    ) -> BoxFuture<Result<(), HandlerError>> {
        let (handler, deadline, ctx) = (self.handler, self.deadline, ctx.clone());
        Box::pin(async move {
            let store = store(&ctx)?;
            let token = token_of(deadline.matched_by, event.event(), &ctx)?;
            if let Some(outcome) = store.outcome(handler, &token).await.map_err(retry)? {
                tracing::debug!(?outcome, token, "deadline decided before it was scheduled");
                return Ok(());
            }
            let at = event.meta().time() + deadline.within;
            let a = event
                .to_message()
                .map_err(|e| HandlerError::permanent(e.to_string()))?;
            store
                .schedule(handler, &token, at, a, ctx.event_id())
                .await
                .map_err(retry)?;
            tracing::debug!(token, %at, "deadline scheduled");
            Ok(())
        })
    }
}

/// Decides "met" when a B arrives, and cancels the schedule.
pub(crate) struct Met<B> {
    handler: &'static str,
    deadline: Deadline,
    name: &'static str,
    _b: PhantomData<fn() -> B>,
}

impl<B: Event> Met<B> {
    pub(crate) fn new(handler: &'static str, deadline: Deadline, name: &'static str) -> Self {
        Self {
            handler,
            deadline,
            name,
            _b: PhantomData,
        }
    }
}

impl<B: Event> Handler for Met<B> {
    type Event = B;

    fn name(&self) -> &'static str {
        self.name
    }

    fn options(&self) -> HandlerOptions {
        helper_options()
    }

    fn call(
        &self,
        event: Envelope<Self::Event>,
        ctx: &Context,
    ) -> BoxFuture<Result<(), HandlerError>> {
        let (handler, deadline, ctx) = (self.handler, self.deadline, ctx.clone());
        Box::pin(async move {
            let store = store(&ctx)?;
            let token = token_of(deadline.matched_by, event.event(), &ctx)?;
            let me = Outcome::Met(ctx.event_id());
            let stands = store
                .decide(handler, &token, me, ctx.correlation_id(), keep(&deadline))
                .await
                .map_err(retry)?;
            match stands {
                // Ours, or an earlier B's: the schedule goes (again, if a
                // crash came between the decision and the purge).
                Outcome::Met(_) => {
                    let purged = store.cancel(handler, &token).await.map_err(retry)?;
                    tracing::debug!(token, purged, "deadline met");
                }
                Outcome::Fired(a) => tracing::info!(
                    deadline = handler,
                    token,
                    fired_for = %a,
                    "arrived after its deadline fired; the deadline handler has run"
                ),
            }
            Ok(())
        })
    }
}

/// Runs the deadline handler on the fired copy, if "fired" wins.
pub(crate) struct Fire<H> {
    inner: Arc<H>,
    deadline: Deadline,
}

impl<H: DeadlineHandler> Fire<H> {
    pub(crate) fn new(inner: H, deadline: Deadline) -> Self {
        Self {
            inner: Arc::new(inner),
            deadline,
        }
    }
}

impl<H: DeadlineHandler> Handler for Fire<H> {
    type Event = H::Event;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn options(&self) -> HandlerOptions {
        self.inner.options()
    }

    fn emits(&self) -> Option<&'static [crate::event::EventType]> {
        self.inner.emits()
    }

    fn deadline(&self) -> Option<Deadline> {
        Some(self.deadline)
    }

    fn check(&self, states: &crate::handler::States) -> Result<(), crate::handler::MissingState> {
        self.inner.check(states)
    }

    fn call(
        &self,
        event: Envelope<Self::Event>,
        ctx: &Context,
    ) -> BoxFuture<Result<(), HandlerError>> {
        let (inner, deadline, ctx) = (self.inner.clone(), self.deadline, ctx.clone());
        Box::pin(async move {
            let store = store(&ctx)?;
            let token = ctx
                .subject()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            let me = Outcome::Fired(ctx.event_id());
            let stands = store
                .decide(
                    inner.name(),
                    &token,
                    me.clone(),
                    ctx.correlation_id(),
                    keep(&deadline),
                )
                .await
                .map_err(retry)?;
            if stands == me {
                return inner.call(event, &ctx).await;
            }
            tracing::info!(
                deadline = inner.name(),
                token,
                outcome = ?stands,
                "deadline passed but was decided first; the handler does not run"
            );
            Ok(())
        })
    }
}
