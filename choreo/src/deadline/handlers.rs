//! The three consumers one deadline handler runs as:
//!
//! - [`Schedule`] on A's stream (`<handler>__schedule`): schedules A's copy
//!   for A's stored time + T (the deadline's due time), unless the deadline
//!   is decided already.
//! - [`Met`] on each B's stream (`<handler>__met_<B>`): for a B stored by
//!   the due time, decides "met" for B's token and purges the schedule; a B
//!   stored later decides nothing.
//! - [`Fire`] on the deadline stream (the handler's own name): once every
//!   watcher has handled every B stored by the due time, decides "fired"
//!   for the fired copy and, if that write won, runs the handler. Until
//!   then it puts the copy off by [`RECHECK`].
//!
//! So the outcome follows the server's clock: a B stored in time wins
//! however late its watcher gets to it, and a B stored late loses however
//! early.
//!
//! Each is an ordinary handler to the runtime, with its retries, dead
//! letters, tracing and metrics.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::watch::Watchers;
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

/// How long a fired copy is put off while a B watcher has not yet handled
/// a B stored by the deadline's due time.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

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

    fn part_of(&self) -> Option<&'static str> {
        Some(self.handler)
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
            // The server's clock: A's stored time (its `ce-time` only
            // where the server gave none).
            let a_time = ctx.stored_at().unwrap_or_else(|| event.meta().time());
            let due = a_time + deadline.within;
            let a = event
                .to_message()
                .map_err(|e| HandlerError::permanent(e.to_string()))?;
            let id = format!("deadline:{}.{handler}:{}", ctx.service(), ctx.event_id());
            store
                .schedule(handler, &token, (due, due), (a, Some(event.subject())), &id)
                .await
                .map_err(retry)?;
            tracing::debug!(token, %due, "deadline scheduled");
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

    fn part_of(&self) -> Option<&'static str> {
        Some(self.handler)
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
            // Stored after the due time: too late, whatever the order in
            // which the consumers get to it. The fired copy decides.
            if let Some(stored) = ctx.stored_at()
                && let Some((due, _)) = store.due(handler, &token).await.map_err(retry)?
                && stored > due
            {
                tracing::info!(
                    deadline = handler,
                    token,
                    event_id = %ctx.event_id(),
                    late_ms = super::unix_ms(stored) - super::unix_ms(due),
                    "stored after its deadline was due; it does not meet it"
                );
                return Ok(());
            }
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

/// Runs the deadline handler on the fired copy, if "fired" wins; puts the
/// copy off while a B stored in time may not have been handled yet.
pub(crate) struct Fire<H> {
    inner: Arc<H>,
    deadline: Deadline,
    /// The B watchers, made on the first fired copy (they need the
    /// service's name).
    watchers: Arc<OnceLock<Watchers>>,
}

impl<H: DeadlineHandler> Fire<H> {
    pub(crate) fn new(inner: H, deadline: Deadline) -> Self {
        Self {
            inner: Arc::new(inner),
            deadline,
            watchers: Arc::new(OnceLock::new()),
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
        let arrived = Instant::now();
        let (inner, deadline, ctx) = (self.inner.clone(), self.deadline, ctx.clone());
        let watchers = self.watchers.clone();
        Box::pin(async move {
            let store = store(&ctx)?;
            let name = inner.name();
            let token = ctx
                .subject()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            let me = Outcome::Fired(ctx.event_id());
            match store.outcome(name, &token).await.map_err(retry)? {
                // A redelivery of our own decision: run again (the
                // handler's inbox skips it once handled).
                Some(o) if o == me => return inner.call(event, &ctx).await,
                Some(stands) => {
                    stands_down(name, &token, &stands);
                    return Ok(());
                }
                None => {}
            }
            let (due, a_subject) = match store.due(name, &token).await.map_err(retry)? {
                Some((due, subject)) => (due, subject),
                None => (
                    ctx.stored_at()
                        .unwrap_or_else(|| event.meta().time() + deadline.within),
                    None,
                ),
            };
            let watchers = watchers
                .get_or_init(|| Watchers::new(ctx.service(), deadline.unless, deadline.met));
            let reading = watchers
                .read_since(store.js(), arrived)
                .await
                .map_err(retry)?;
            if let Some((b, oldest)) = reading.behind(due) {
                // A B stored in time may be among what this watcher has
                // yet to handle: look again in a moment, as a schedule,
                // which B's "met" purges.
                let at = time::OffsetDateTime::now_utc() + RECHECK;
                let a = event
                    .to_message()
                    .map_err(|e| HandlerError::permanent(e.to_string()))?;
                let id = format!(
                    "deadline:{}.{name}:{}:{}",
                    ctx.service(),
                    ctx.event_id(),
                    ctx.stream_sequence()
                );
                store
                    .schedule(name, &token, (at, due), (a, a_subject.as_deref()), &id)
                    .await
                    .map_err(retry)?;
                tracing::info!(
                    deadline = name,
                    token,
                    event_id = %ctx.event_id(),
                    waits_for = b,
                    behind_ms = super::unix_ms(due) - super::unix_ms(oldest),
                    recheck_in = ?RECHECK,
                    "deadline passed, but its watcher of {b} has not handled every {b} stored in time; deciding later"
                );
                ctx.put_off();
                return Ok(());
            }
            let stands = store
                .decide(
                    name,
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
            stands_down(name, &token, &stands);
            Ok(())
        })
    }
}

/// Logs that a fired copy found the deadline decided otherwise.
fn stands_down(deadline: &str, token: &str, stands: &Outcome) {
    tracing::info!(
        deadline,
        token,
        outcome = ?stands,
        "deadline passed but was decided first; the handler does not run"
    );
}
