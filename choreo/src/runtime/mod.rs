//! The per-handler runtime: pulling (with one batched inbox read per pulled
//! batch), handling one event (decode → look up → run → emit → record → ack,
//! or nak / dead-letter), and turning lost last deliveries into dead letters.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::future::{AbortHandle, Abortable, Aborted};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::context::{Context, Delivery};
use crate::dlq::{self, Letter, Reason};
use crate::envelope::Envelope;
use crate::error::StreamError;
use crate::event::Event;
use crate::handler::{BoxFuture, Handler, HandlerOptions, MissingState, States};
use crate::inbox::{self, Inbox, InboxError, Record, Sighting, Verdict};
use crate::publish::Publisher;
use crate::service::{
    FaultHook, FaultPoint, HandlerStats, RunError, consumer_name, create_consumer,
};
use pull::{Pulled, Puller, Slot};
use watchdog::{KeyState, Registry};

mod pull;
pub(crate) mod watchdog;

/// What every task of one handler shares.
pub(crate) struct Runtime {
    pub(crate) service: Arc<str>,
    pub(crate) handler: &'static str,
    pub(crate) handler_id: Arc<str>,
    pub(crate) stream: &'static str,
    /// The name of the event the handler consumes.
    pub(crate) event_type: &'static str,
    pub(crate) options: HandlerOptions,
    pub(crate) publisher: Publisher,
    pub(crate) states: Arc<States>,
    pub(crate) stats: Arc<HandlerStats>,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) inbox: Option<Inbox>,
    pub(crate) fault: Option<FaultHook>,
    /// The running invocations, kept alive by the watchdog.
    pub(crate) watchdog: Registry,
    /// How long a failure that may pass (the consumer cannot be recreated,
    /// the inbox bucket is missing) is retried before the service stops
    /// with an error.
    pub(crate) recovery_timeout: Duration,
    /// What the server's consumer says, read back after creating it and
    /// every few seconds: it is the truth when instances disagree.
    pub(crate) live: Live,
}

/// The consumer's settings as the server has them, and its ack floor.
#[derive(Debug, Default)]
pub(crate) struct Live {
    max_deliver: std::sync::atomic::AtomicU32,
    ack_wait_ms: std::sync::atomic::AtomicU64,
    /// Every stream sequence up to this one is acknowledged.
    ack_floor: std::sync::atomic::AtomicU64,
}

impl Live {
    /// Takes the server's view of the consumer; says what changed.
    pub(crate) fn follow(&self, info: &jetstream::consumer::Info) -> Option<String> {
        let c = &info.config;
        self.ack_floor
            .fetch_max(info.ack_floor.stream_sequence, Ordering::Relaxed);
        let max_deliver = u32::try_from(c.max_deliver.max(1)).unwrap_or(u32::MAX);
        let ack_wait = u64::try_from(c.ack_wait.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        let old_md = self.max_deliver.swap(max_deliver, Ordering::Relaxed);
        let old_aw = self.ack_wait_ms.swap(ack_wait, Ordering::Relaxed);
        let first = old_md == 0;
        (!first && (old_md != max_deliver || old_aw != ack_wait)).then(|| {
            format!("max_deliver {old_md} -> {max_deliver}, ack_wait {old_aw}ms -> {ack_wait}ms")
        })
    }

    /// The stream sequence every earlier one of which is acknowledged.
    pub(crate) fn ack_floor(&self) -> u64 {
        self.ack_floor.load(Ordering::Relaxed)
    }
}

impl Runtime {
    /// Deliveries before the dead-letter stream, as the server's consumer
    /// has it.
    pub(crate) fn max_deliver(&self) -> u32 {
        match self.live.max_deliver.load(Ordering::Relaxed) {
            0 => self.options.max_deliver,
            n => n,
        }
    }

    /// The consumer's `ack_wait`, as the server has it.
    pub(crate) fn ack_wait(&self) -> Duration {
        match self.live.ack_wait_ms.load(Ordering::Relaxed) {
            0 => self.options.ack_wait,
            ms => Duration::from_millis(ms),
        }
    }
}

/// What the pull loop's batched inbox read said about one event.
pub(crate) enum Seen {
    /// Not read (no inbox, or no readable event id): read when needed.
    NotRead,
    /// The key's record, or `None` if it has none.
    Read(Option<Record>),
}

/// Logs a warning or error about one delivery, with its identity as fields
/// of the line itself — service, handler, event type, event id, subject,
/// attempt and stream sequence — so that logs kept at `warn` say which
/// event it was, whatever the subscriber does with spans.
macro_rules! about {
    ($level:ident, $rt:expr, $msg:expr, $($rest:tt)+) => {{
        let (attempt, stream_sequence) = $crate::runtime::delivery_of($msg);
        tracing::$level!(
            service = %$rt.service,
            handler = %$rt.handler,
            event_type = %$rt.event_type,
            event_id = %$crate::runtime::event_id_of($msg),
            subject = %$msg.subject,
            attempt,
            stream_sequence,
            $($rest)+
        )
    }};
}

/// A delivery's attempt and stream sequence (1 and 0 if unreadable).
pub(crate) fn delivery_of(msg: &jetstream::Message) -> (u32, u64) {
    match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    }
}

/// A delivery's `ce-id` as sent (`-` if it has none).
pub(crate) fn event_id_of(msg: &jetstream::Message) -> &str {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(crate::headers::CE_ID))
        .map_or("-", |v| v.as_str())
}

/// A handler with its event type erased.
pub(crate) trait Erased: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn event_type(&self) -> &'static str;
    fn options(&self) -> HandlerOptions;
    fn stream(&self) -> (&'static str, &'static str, &'static str);
    fn check(&self, states: &States) -> Result<(), MissingState>;
    fn process(
        self: Arc<Self>,
        msg: jetstream::Message,
        seen: Seen,
        rt: Arc<Runtime>,
    ) -> BoxFuture<()>;
}

pub(crate) struct Typed<H>(pub(crate) H);

impl<H> std::fmt::Debug for Typed<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::any::type_name::<H>())
    }
}

impl<H: Handler> Erased for Typed<H> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn event_type(&self) -> &'static str {
        H::Event::NAME
    }
    fn options(&self) -> HandlerOptions {
        self.0.options()
    }
    fn stream(&self) -> (&'static str, &'static str, &'static str) {
        (
            H::Event::STREAM,
            H::Event::STREAM_SUBJECTS,
            H::Event::SUBJECT_FILTER,
        )
    }
    fn check(&self, states: &States) -> Result<(), MissingState> {
        self.0.check(states)
    }
    fn process(
        self: Arc<Self>,
        msg: jetstream::Message,
        seen: Seen,
        rt: Arc<Runtime>,
    ) -> BoxFuture<()> {
        Box::pin(process::<H>(self, msg, seen, rt))
    }
}

pub(crate) async fn pull_loop(
    handler: Arc<dyn Erased>,
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), RunError> {
    let permits = Arc::new(Semaphore::new(rt.options.concurrency));
    let mut running = JoinSet::new();
    let _keeper = watchdog::Keeper::start(rt.clone());
    let max_request = rt.options.concurrency.clamp(1, 500);
    let mut puller = loop {
        match Puller::new(
            rt.js.clone(),
            consumer.clone(),
            permits.clone(),
            max_request,
        )
        .await
        {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(service = %rt.service, handler = rt.handler, error = %e, "cannot subscribe for pulled events; retrying in 1s");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    // One timer for the slow checks, armed once: a loop iteration (one per
    // pulled chunk) creates no timer and no semaphore waiter of its own.
    // Once a second: silent pull requests and a missing inbox; every
    // `ack_wait` (1 to 5 s): the consumer as the server has it — its
    // settings (another version of the service may have changed them) and
    // its ack floor (where to recreate it if an operator deletes it).
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config_every = rt.options.ack_wait.as_secs().clamp(1, 5);
    let mut ticks = 0_u64;
    let mut permits_free = Box::pin(puller.wait_for_permits());
    // The threshold the pending wait was made with: renewed when fewer
    // outstanding events call for a smaller one.
    let mut waiting_for = puller.threshold();
    let mut failure = None;
    loop {
        reap(&rt, &mut running);
        if failure.is_some() {
            break;
        }
        let first = tokio::select! {
            _ = stop.changed() => break,
            permit = &mut permits_free => {
                if let Err(e) = puller.send(permit).await {
                    tracing::warn!(service = %rt.service, handler = rt.handler, error = %e, "cannot request events; retrying in 1s");
                    tokio::select! {
                        _ = stop.changed() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                permits_free.set(puller.wait_for_permits());
                waiting_for = puller.threshold();
                continue;
            }
            _ = housekeeping.tick() => {
                ticks += 1;
                if puller.check_silence() {
                    tracing::debug!(service = %rt.service, handler = rt.handler, "pull requests went silent; asking again");
                    failure = refresh_consumer(&handler, &rt, &mut puller, None, &mut stop).await.err();
                }
                if puller.threshold() < waiting_for {
                    // Requests expired or were forgotten: fewer free
                    // permits are enough to ask again.
                    permits_free.set(puller.wait_for_permits());
                    waiting_for = puller.threshold();
                }
                if failure.is_none() && rt.inbox.as_ref().is_some_and(|i| i.troubled_for().is_some()) {
                    failure = check_inbox(&rt).await.err();
                }
                if ticks.is_multiple_of(config_every) {
                    follow_consumer(&rt, puller.consumer()).await;
                }
                continue;
            }
            p = puller.next() => p,
        };
        // Everything already pulled goes in one batch, whose inbox keys are
        // read with one request.
        let mut chunk = Vec::new();
        let mut next = Some(first);
        while let Some(pulled) = next.take() {
            match pulled {
                Pulled::Event(msg, slot) => chunk.push((msg, slot)),
                Pulled::Status => {}
                Pulled::ConsumerGone(why) => {
                    spawn_all(&handler, &rt, &mut running, chunk).await;
                    failure = refresh_consumer(&handler, &rt, &mut puller, Some(&why), &mut stop)
                        .await
                        .err();
                    chunk = Vec::new();
                    break;
                }
                Pulled::Ended => {
                    spawn_all(&handler, &rt, &mut running, chunk).await;
                    chunk = Vec::new();
                    tracing::warn!(service = %rt.service, handler = rt.handler, "the pull subscription ended; subscribing again");
                    if let Ok(p) = Puller::new(
                        rt.js.clone(),
                        puller.consumer().clone(),
                        permits.clone(),
                        max_request,
                    )
                    .await
                    {
                        puller = p;
                    }
                    break;
                }
            }
            if chunk.len() < inbox::READ_BATCH {
                next = puller.next_now();
            }
        }
        spawn_all(&handler, &rt, &mut running, chunk).await;
        if puller.threshold() < waiting_for {
            permits_free.set(puller.wait_for_permits());
            waiting_for = puller.threshold();
        }
    }
    // Shutdown: no more requests. What the server sent before it saw the
    // unsubscribe still arrives, and runs: it was pulled with a permit.
    puller.drain().await;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), puller.next()).await {
            Ok(Pulled::Event(msg, slot)) => {
                spawn(&handler, &rt, &mut running, msg, Seen::NotRead, slot)
            }
            Ok(Pulled::Status | Pulled::ConsumerGone(_)) => {}
            Ok(Pulled::Ended) | Err(_) => break,
        }
    }
    // Let running handlers finish.
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = running.join_next().await {
            count_task_failure(&rt, done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(service = %rt.service, handler = rt.handler, "handlers still running after the grace period were abandoned; their events will be redelivered");
        running.abort_all();
    }
    failure.map_or(Ok(()), Err)
}

/// Reads the consumer back from the server and follows its settings.
async fn follow_consumer(rt: &Runtime, consumer: &jetstream::consumer::PullConsumer) {
    let mut consumer = consumer.clone();
    match consumer.info().await {
        Ok(info) => {
            if let Some(change) = rt.live.follow(info) {
                tracing::warn!(service = %rt.service, handler = rt.handler, change = %change, "the consumer's settings changed on the server (another version of this service?); following them");
            }
        }
        Err(e) => {
            tracing::debug!(service = %rt.service, handler = rt.handler, error = %e, "cannot read the consumer back")
        }
    }
}

/// Fails once the inbox has been unreadable for the recovery timeout and
/// its bucket does not exist; an inbox that exists but fails (an election,
/// a slow server) is waited for.
async fn check_inbox(rt: &Runtime) -> Result<(), RunError> {
    let Some(inbox) = &rt.inbox else {
        return Ok(());
    };
    let Some(troubled) = inbox.troubled_for() else {
        return Ok(());
    };
    if troubled < rt.recovery_timeout {
        return Ok(());
    }
    match rt.js.get_stream(format!("KV_{}", inbox.bucket())).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            tracing::error!(service = %rt.service, handler = rt.handler, bucket = inbox.bucket(), ?troubled, error = %e, "the inbox bucket is gone; stopping the service");
            Err(RunError::InboxLost {
                service: rt.service.to_string(),
                bucket: inbox.bucket().to_owned(),
                missing_for: troubled,
            })
        }
        Err(_) => Ok(()),
    }
}

/// Runs a pulled batch: reads its inbox keys (with one request when it is
/// large), then spawns one task per event, each holding its permit.
async fn spawn_all(
    handler: &Arc<dyn Erased>,
    rt: &Arc<Runtime>,
    running: &mut JoinSet<()>,
    chunk: Vec<(jetstream::Message, Slot)>,
) {
    if chunk.is_empty() {
        return;
    }
    let seen = read_inbox(rt, chunk.iter().map(|(m, _)| m)).await;
    for ((msg, slot), seen) in chunk.into_iter().zip(seen) {
        spawn(handler, rt, running, msg, seen, slot);
    }
}

fn spawn(
    handler: &Arc<dyn Erased>,
    rt: &Arc<Runtime>,
    running: &mut JoinSet<()>,
    msg: jetstream::Message,
    seen: Seen,
    slot: Slot,
) {
    let fut = handler.clone().process(msg, seen, rt.clone());
    running.spawn(async move {
        fut.await;
        drop(slot);
    });
}

/// Collects finished tasks, counting any that panicked.
fn reap(rt: &Runtime, running: &mut JoinSet<()>) {
    while let Some(done) = running.try_join_next() {
        count_task_failure(rt, done);
    }
}

/// A task that runs one event panicked outside the handler's panic guard
/// (a bug in choreo, or a fault hook): its event gets no verdict from this
/// instance and is redelivered after `ack_wait`.
fn count_task_failure(rt: &Runtime, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        rt.stats.task_panics.fetch_add(1, Ordering::Relaxed);
        let panic = e.into_panic();
        tracing::error!(
            service = %rt.service,
            handler = rt.handler,
            panic = %panic_message(&*panic),
            "a task handling an event panicked outside the panic guard; the event will be redelivered after ack_wait"
        );
    }
}

/// Gets the consumer again after its requests went silent or the server
/// said it is gone, recreating it if it no longer exists. Fails once it
/// could not be recreated for the recovery timeout.
async fn refresh_consumer(
    handler: &Arc<dyn Erased>,
    rt: &Runtime,
    puller: &mut Puller,
    why: Option<&str>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), RunError> {
    let (stream, _, filter) = handler.stream();
    let durable = consumer_name(&rt.service, rt.handler);
    if why.is_none()
        && rt
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&durable, stream)
            .await
            .is_ok()
    {
        return Ok(());
    }
    if let Some(why) = why {
        tracing::warn!(service = %rt.service, handler = rt.handler, consumer = %durable, reason = why, "the consumer is gone; recreating it");
    }
    tokio::select! {
        _ = stop.changed() => return Ok(()),
        () = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    // Just after the last known ack floor: what was acknowledged is not
    // delivered again, and what was delivered but not acknowledged is.
    let start_at = rt.live.ack_floor() + 1;
    let created = create_consumer(
        &rt.js,
        stream,
        &durable,
        filter,
        &rt.options,
        rt.handler,
        Some(start_at),
    )
    .await;
    let created = match created {
        Ok(c) => Ok(c),
        // Another instance may have recreated it first.
        Err(e) => rt
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&durable, stream)
            .await
            .map_err(|_| e),
    };
    match created {
        Ok(c) => {
            tracing::info!(service = %rt.service, handler = rt.handler, consumer = %durable, start_at, "consumer recreated just after its last known ack floor");
            rt.live.follow(c.cached_info());
            puller.set_consumer(c);
            puller.trouble_since = None;
            Ok(())
        }
        Err(e) => {
            let since = *puller
                .trouble_since
                .get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= rt.recovery_timeout {
                tracing::error!(service = %rt.service, handler = rt.handler, consumer = %durable, error = %e, "the consumer cannot be recreated; stopping the service");
                return Err(RunError::ConsumerLost {
                    service: rt.service.to_string(),
                    handler: rt.handler.to_owned(),
                    failing_for: since.elapsed(),
                    source: Box::new(e),
                });
            }
            tracing::warn!(service = %rt.service, handler = rt.handler, consumer = %durable, error = %e, "cannot recreate the consumer; retrying");
            Ok(())
        }
    }
}

/// The inbox key of a pulled event, from its `ce-id` header; `None` if it
/// has none readable (decoding will dead-letter it).
fn key_of(rt: &Runtime, msg: &jetstream::Message) -> Option<String> {
    let id = msg.headers.as_ref()?.get(crate::headers::CE_ID)?.as_str();
    let id: crate::EventId = id.parse().ok()?;
    Some(inbox::key(rt.handler, id))
}

/// Below this many events pulled at once, each event reads its own inbox
/// key in its own task (in parallel), so that under light load no event
/// waits in the pull loop for a batch's read.
const BATCHED_READ_FROM: usize = 8;

/// Reads the inbox keys of a pulled batch with one request (see
/// [`BATCHED_READ_FROM`]).
async fn read_inbox<'a>(
    rt: &Runtime,
    chunk: impl ExactSizeIterator<Item = &'a jetstream::Message>,
) -> Vec<Seen> {
    let len = chunk.len();
    let Some(inbox) = rt
        .inbox
        .as_ref()
        .filter(|i| i.reads_in_batches() && len >= BATCHED_READ_FROM)
    else {
        return (0..len).map(|_| Seen::NotRead).collect();
    };
    let keys: Vec<Option<String>> = chunk.map(|m| key_of(rt, m)).collect();
    let wanted: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
    let read = inbox.read_many(&wanted).await;
    rt.stats.inbox_batch_reads.fetch_add(1, Ordering::Relaxed);
    match &read {
        Ok(found) => {
            tracing::debug!(handler = %rt.handler_id, keys = wanted.len(), found = found.len(), "batched inbox read")
        }
        Err(e) => {
            tracing::warn!(service = %rt.service, handler = rt.handler, keys = wanted.len(), error = %e, paused = !inbox.reads_in_batches(), "batched inbox read failed; these events read their own keys (for a minute if the failure will recur)")
        }
    }
    keys.into_iter()
        .map(|key| match (&read, key) {
            (_, None) => Seen::NotRead,
            (Ok(found), Some(key)) => Seen::Read(found.get(&key).copied()),
            // Each event reads its own key; if the inbox is down, those
            // reads fail too and the events come back.
            (Err(_), Some(_)) => Seen::NotRead,
        })
        .collect()
}

async fn process<H: Handler>(
    handler: Arc<Typed<H>>,
    msg: jetstream::Message,
    seen: Seen,
    rt: Arc<Runtime>,
) {
    let (attempt, stream_sequence) = match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    };
    let subject = msg.subject.to_string();
    let span = tracing::info_span!(
        "choreo.handle",
        service = %rt.service,
        handler = rt.handler,
        event_type = H::Event::NAME,
        event_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        causation_id = tracing::field::Empty,
        traceparent = tracing::field::Empty,
        attempt,
        stream_sequence,
        subject = %subject,
    );
    let delivery = Delivery {
        subject,
        attempt,
        stream_sequence,
    };
    // The handler's own code runs under its guard inside; this one catches
    // a panic in choreo's part (or a fault hook), so it is counted and
    // logged with the event's identity. The event then has no verdict from
    // this instance and is redelivered after `ack_wait`.
    let handled = AssertUnwindSafe(handle::<H>(&handler.0, &msg, seen, &rt, delivery))
        .catch_unwind()
        .instrument(span)
        .await;
    if let Err(panic) = handled {
        rt.stats.task_panics.fetch_add(1, Ordering::Relaxed);
        about!(
            error,
            rt,
            &msg,
            panic = %panic_message(&*panic),
            "handling the event panicked outside the handler's guard; it will be redelivered after ack_wait"
        );
    }
}

/// Decode → look up → run (kept alive by the watchdog) → emit → record →
/// ack, or nak / dead-letter. Every path ends with a verdict, except a fault
/// point.
async fn handle<H: Handler>(
    handler: &H,
    msg: &jetstream::Message,
    seen: Seen,
    rt: &Runtime,
    delivery: Delivery,
) {
    let (attempt, seq) = (delivery.attempt, delivery.stream_sequence);
    let empty = async_nats::HeaderMap::new();
    let headers = msg.headers.as_ref().unwrap_or(&empty);
    // Decoding runs the event's `Deserialize` and `From` upcasts: user code,
    // under the panic guard. A panic there is as deterministic as a bad
    // payload, so the event is dead-lettered at once.
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Envelope::<H::Event>::decode(&delivery.subject, headers, &msg.payload)
    }));
    let env = match decoded {
        Ok(Ok(env)) => env,
        Err(panic) => {
            rt.stats.panicked.fetch_add(1, Ordering::Relaxed);
            let detail = format!("decoding the event panicked: {}", panic_message(&*panic));
            about!(warn, rt, msg, error = %detail, "cannot decode the event; dead-lettering it");
            dead_letter(rt, msg, Reason::UndecodablePayload, &detail, attempt, seq).await;
            return;
        }
        Ok(Err(e)) => {
            about!(warn, rt, msg, error = %e, "cannot decode the event; dead-lettering it");
            dead_letter(
                rt,
                msg,
                Reason::from_decode(&e),
                &e.to_string(),
                attempt,
                seq,
            )
            .await;
            return;
        }
    };
    let meta = env.meta();
    let span = tracing::Span::current();
    span.record("event_id", tracing::field::display(meta.id()));
    span.record(
        "correlation_id",
        tracing::field::display(meta.correlation_id()),
    );
    if let Some(c) = meta.causation_id() {
        span.record("causation_id", tracing::field::display(c));
    }
    if let Some(t) = meta.traceparent() {
        span.record("traceparent", t);
    }

    // The inbox: skip what is handled, wait for what another instance runs.
    // Then registered until the verdict: the watchdog sends in-progress acks
    // (and writes the claim) meanwhile, and another copy of the same event
    // pulled by this instance waits for this one's outcome, then looks again.
    let id = meta.id();
    let key = inbox::key(rt.handler, id);
    let inbox_key = rt.inbox.as_ref().map(|_| key.as_str());
    let mut seen = seen;
    let mut waited = false;
    let (abort, abort_registration) = AbortHandle::new_pair();
    let entered = loop {
        let mut revision = 0;
        if let Some(inbox) = &rt.inbox {
            let seen = std::mem::replace(&mut seen, Seen::NotRead);
            let at = Sighting {
                attempt,
                stream_seq: seq,
                me: inbox.instance(),
            };
            let found = look_up(rt, inbox, msg, &key, seen, at).await;
            inbox.note_look_up(found.is_ok());
            match found {
                Ok(Some(rev)) => revision = rev,
                Ok(None) => return skip(rt, msg).await,
                Err(e) => return inbox_unavailable(rt, msg, attempt, &e).await,
            }
        }
        // Refused only for a key already registered, so only with an inbox.
        if let Some(entered) =
            rt.watchdog
                .enter(msg.reply.clone(), inbox_key, revision, seq, abort.clone())
        {
            break entered;
        }
        if !waited {
            rt.stats.waited.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "another copy of this event is being handled here; waiting for its outcome"
            );
            waited = true;
        }
        Box::pin(wait_while_running(rt, msg, &key)).await;
    };
    let ctx = Context::new(
        meta.clone(),
        delivery,
        rt.service.clone(),
        rt.handler,
        rt.handler_id.clone(),
        rt.states.clone(),
    );
    // Everything the handler's code does runs under the panic guard: its
    // extractors and a hand-written `call` as well as the future. The
    // watchdog aborts it at its timeout.
    let guarded = AssertUnwindSafe(async { handler.call(env, &ctx).await }).catch_unwind();
    let guarded = std::pin::pin!(Abortable::new(guarded, abort_registration));
    let result = RequeuedPolls::new(guarded).await;
    let KeyState { revision, claimed } = entered.finish();
    let claim = claimed.then_some(revision);
    let outgoing = ctx.take_outgoing();
    let mut reason = Reason::MaxDeliverExceeded;
    let error = match result {
        Err(Aborted) => {
            rt.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            reason = Reason::Timeout;
            format!("the handler timed out after {:?}", rt.options.timeout)
        }
        Ok(result) => match result {
            Ok(Ok(())) => match emit_record_ack(rt, msg, id, outgoing, &key, revision).await {
                Done::Finished => return,
                Done::DeadLetter(reason, detail) => {
                    release(rt, &key, claim).await;
                    dead_letter(rt, msg, reason, &detail, attempt, seq).await;
                    return;
                }
                Done::Retry(e) => e,
            },
            Ok(Err(e)) if e.is_permanent() => {
                about!(warn, rt, msg, error = %e, "handler failed permanently; dead-lettering the event");
                release(rt, &key, claim).await;
                dead_letter(
                    rt,
                    msg,
                    Reason::PermanentError,
                    &e.to_string(),
                    attempt,
                    seq,
                )
                .await;
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => {
                rt.stats.panicked.fetch_add(1, Ordering::Relaxed);
                format!("handler panicked: {}", panic_message(&*panic))
            }
        },
    };
    release(rt, &key, claim).await;
    if attempt >= rt.max_deliver() {
        about!(warn, rt, msg, error = %error, "failed on the last allowed delivery; dead-lettering the event");
        dead_letter(rt, msg, reason, &error, attempt, seq).await;
    } else {
        let delay = rt.options.delay_after(attempt);
        tracing::info!(error = %error, retry_in = ?delay, "handler failed; will retry");
        rt.stats.retried.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            about!(warn, rt, msg, error = %e, "nak failed; the event will be redelivered after ack_wait");
        }
    }
}

/// Polls the handler only from the back of its worker's run queue, with an
/// idle worker told, so that a handler blocking its thread does not freeze
/// the runtime.
///
/// Tokio drives I/O and timers from one idle worker at a time. A task woken
/// by that driver runs next on the very worker that was driving, and no
/// other worker is told (nothing else is queued). If the handler then blocks
/// its thread, nobody drives: every connection and timer of the runtime
/// stops, the watchdog's in-progress acks with them, and the event is
/// redelivered elsewhere after `ack_wait`. (Without this, the test whose
/// handler blocks in its first poll failed about one run in twelve, and the
/// one whose handler blocks after awaiting a timer 16 runs in 20.)
///
/// So before each poll the task wakes itself and returns `Pending`: tokio
/// puts a task woken while running at the back of the run queue, where
/// other workers can take it, and tells an idle worker, which takes the
/// driver over when it finds nothing to do. (`tokio::task::yield_now` does
/// not promise this: it defers the wake until the worker has polled its
/// driver, after which the task can run on that worker again with nobody
/// told.)
struct RequeuedPolls<F> {
    inner: F,
    requeued: bool,
}

impl<F> RequeuedPolls<F> {
    fn new(inner: F) -> Self {
        Self {
            inner,
            requeued: false,
        }
    }
}

impl<F: Future + Unpin> Future for RequeuedPolls<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        if !self.requeued {
            self.requeued = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.requeued = false;
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// Waits until no invocation of this instance handles `key`, keeping the
/// waiting delivery alive with in-progress acks.
async fn wait_while_running(rt: &Runtime, msg: &jetstream::Message, key: &str) {
    let progress_every = rt.ack_wait() / 3;
    let mut since_progress = Duration::ZERO;
    let step = Duration::from_millis(20);
    while rt.watchdog.is_running(key) {
        tokio::time::sleep(step).await;
        since_progress += step;
        if since_progress >= progress_every {
            let _ = msg.ack_with(AckKind::Progress).await;
            since_progress = Duration::ZERO;
        }
    }
}

/// Acks a delivery the inbox shows handled.
async fn skip(rt: &Runtime, msg: &jetstream::Message) {
    rt.stats.skipped.fetch_add(1, Ordering::Relaxed);
    tracing::info!("already handled (inbox); acked and skipped");
    if let Err(e) = msg.ack().await {
        about!(warn, rt, msg, error = %e, "ack failed; the event will be redelivered and skipped again");
    }
}

/// Naks a delivery whose inbox key cannot be read: it comes back later.
async fn inbox_unavailable(rt: &Runtime, msg: &jetstream::Message, attempt: u32, e: &InboxError) {
    about!(warn, rt, msg, error = %e, "inbox unavailable; the event will come back");
    let _ = msg
        .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
        .await;
}

enum Done {
    /// Acked (or stopped at a fault point).
    Finished,
    /// No retry can succeed.
    DeadLetter(Reason, String),
    /// Try again later.
    Retry(String),
}

/// After `Ok`: publish every emission (awaiting each PubAck), record the
/// event in the inbox, then ack.
async fn emit_record_ack(
    rt: &Runtime,
    msg: &jetstream::Message,
    id: crate::EventId,
    outgoing: Vec<Result<crate::publish::Outgoing, crate::PublishError>>,
    key: &str,
    revision: u64,
) -> Done {
    let fault = |point| rt.fault.as_ref().is_some_and(|f| f(point, id));
    let mut outs = Vec::with_capacity(outgoing.len());
    for o in outgoing {
        match o {
            Ok(o) => outs.push(o),
            Err(e) => {
                about!(error, rt, msg, error = %e, "an emitted event could not be built");
                return Done::DeadLetter(Reason::EmitFailed, e.to_string());
            }
        }
    }
    if fault(FaultPoint::BeforeEmit) {
        return Done::Finished;
    }
    // With a fault hook, the first emission goes alone so a test can stop
    // between two emissions; otherwise all are pipelined.
    let emitted = outs.len();
    let rest = if rt.fault.is_some() && outs.len() > 1 {
        outs.split_off(1)
    } else {
        Vec::new()
    };
    for (i, part) in [outs, rest].into_iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        if i == 1 && fault(FaultPoint::BetweenEmits) {
            return Done::Finished;
        }
        match rt.publisher.send_all(part).await {
            Ok(_) => {}
            Err(
                e @ (crate::PublishError::TooLarge { .. }
                | crate::PublishError::Stream(StreamError::DoesNotCover { .. })),
            ) => {
                return Done::DeadLetter(Reason::EmitFailed, e.to_string());
            }
            Err(e) => return Done::Retry(format!("publishing emitted events failed: {e}")),
        }
    }
    if fault(FaultPoint::AfterEmit) {
        return Done::Finished;
    }
    // Not recorded, so not acked: it comes back, and its emissions (same
    // ids) are deduplicated.
    if let Some(inbox) = &rt.inbox
        && let Err(e) = Box::pin(inbox.done(key, revision)).await
    {
        return Done::Retry(format!("recording the event in the inbox failed: {e}"));
    }
    if fault(FaultPoint::AfterRecord) {
        return Done::Finished;
    }
    if let Err(e) = msg.ack().await {
        about!(warn, rt, msg, error = %e, "ack failed; the event will be redelivered and skipped by the inbox");
    }
    rt.stats.handled.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(emitted, "handled");
    Done::Finished
}

async fn release(rt: &Runtime, key: &str, claim: Option<u64>) {
    if let (Some(inbox), Some(rev)) = (&rt.inbox, claim) {
        Box::pin(inbox.release(key, rev)).await;
    }
}

/// [`look_up_or_wait`], without a wait (or an allocation) when the pull
/// loop's batched read already settled it.
async fn look_up(
    rt: &Runtime,
    inbox: &Inbox,
    msg: &jetstream::Message,
    key: &str,
    seen: Seen,
    at: Sighting,
) -> Result<Option<u64>, InboxError> {
    if let Seen::Read(record) = seen {
        match inbox::decide(record, at) {
            Verdict::Run(revision) => return Ok(Some(revision)),
            Verdict::Done => return Ok(None),
            Verdict::Busy => {}
        }
    }
    Box::pin(look_up_or_wait(rt, inbox, msg, key, seen, at)).await
}

/// Decides from the inbox whether to run: `Ok(Some(revision))` to run (the
/// key's revision, 0 if absent), `Ok(None)` if already handled. While
/// another invocation's claim keeps being refreshed, waits (sending
/// in-progress acks) until it finishes or its claim stops moving for a
/// lease (see [`inbox::decide`]).
async fn look_up_or_wait(
    rt: &Runtime,
    inbox: &Inbox,
    msg: &jetstream::Message,
    key: &str,
    seen: Seen,
    at: Sighting,
) -> Result<Option<u64>, InboxError> {
    let lease = inbox::claim_lease(rt.ack_wait());
    let step = (rt.ack_wait() / 3)
        .min(Duration::from_millis(500))
        .max(Duration::from_millis(20));
    let mut seen = seen;
    let mut waited = false;
    let mut watch = inbox::Watch::default();
    loop {
        let record = match seen {
            Seen::Read(record) => record,
            Seen::NotRead => inbox.read(key).await?,
        };
        match inbox::decide(record, at) {
            Verdict::Run(revision) => return Ok(Some(revision)),
            Verdict::Done => return Ok(None),
            Verdict::Busy => {
                let revision = record.map_or(0, |r| r.revision);
                if watch.stale(revision, lease) {
                    tracing::info!(
                        ?lease,
                        "the claim on this event was not refreshed for a lease; taking it over"
                    );
                    return Ok(Some(revision));
                }
                if !waited {
                    rt.stats.waited.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "another instance is handling this event; waiting for its outcome"
                    );
                    waited = true;
                }
                tokio::time::sleep(step).await;
                let _ = msg.ack_with(AckKind::Progress).await;
                seen = Seen::NotRead;
            }
        }
    }
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// Copies the message to the dead-letter stream, then terminates it. If the
/// copy fails the message is nak'd instead, so it comes back: never lost.
/// Boxed: a rare path that would otherwise enlarge every event's future.
fn dead_letter<'a>(
    rt: &'a Runtime,
    msg: &'a jetstream::Message,
    reason: Reason,
    detail: &'a str,
    attempt: u32,
    seq: u64,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(dead_letter_now(rt, msg, reason, detail, attempt, seq))
}

async fn dead_letter_now(
    rt: &Runtime,
    msg: &jetstream::Message,
    reason: Reason,
    detail: &str,
    attempt: u32,
    seq: u64,
) {
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason,
        detail: detail.to_owned(),
        deliveries: u64::from(attempt),
        stream: rt.stream,
        sequence: seq,
        subject: &msg.subject,
    };
    match send_letter(rt, &letter, msg.headers.as_ref(), msg.payload.clone()).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            // `+TERM <reason>` shows the reason in JetStream's MSG_TERMINATED advisory.
            if let Some(reply) = &msg.reply {
                let term = format!("+TERM {}", reason.as_str());
                if let Err(e) = rt.client.publish(reply.clone(), term.into()).await {
                    about!(warn, rt, msg, error = %e, "terminating the dead-lettered message failed");
                }
            }
        }
        Err(e) => {
            about!(error, rt, msg, error = %e, "cannot write to the dead-letter stream; the event will come back");
            let _ = msg
                .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
                .await;
        }
    }
}

async fn send_letter(
    rt: &Runtime,
    letter: &Letter<'_>,
    headers: Option<&async_nats::HeaderMap>,
    payload: bytes::Bytes,
) -> Result<(), String> {
    let subject = dlq::subject(&rt.service, rt.handler);
    let max_payload = rt.client.server_info().max_payload;
    let (headers, payload) = letter.message(headers, payload, max_payload);
    let ack = rt
        .js
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

/// Dead-letters events whose last delivery was lost without a verdict, as
/// JetStream's MAX_DELIVERIES advisories report them.
pub(crate) async fn advisory_loop(
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RunError> {
    loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(10)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(handler = %rt.handler_id, error = %e, "cannot read advisories; retrying in 1s");
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = messages.next() => m,
            };
            match next {
                Some(Ok(msg)) => {
                    let span = tracing::info_span!(
                        "choreo.lost_delivery",
                        service = %rt.service,
                        handler = rt.handler,
                        stream = rt.stream,
                        stream_sequence = tracing::field::Empty,
                    );
                    handle_advisory(&rt, &msg).instrument(span).await;
                }
                Some(Err(e)) => tracing::debug!(error = %e, "advisory pull error"),
                None => break,
            }
        }
    }
}

/// Checks a `MAX_DELIVERIES` advisory against the handler's own consumer
/// before anything is copied: anyone allowed to publish on
/// `$JS.EVENT.ADVISORY.>` could forge one. It must name this handler's
/// stream and durable; the message must have been delivered by the consumer
/// and not acknowledged (above its ack floor, at most its last delivered
/// sequence), be on the handler's subjects, and not be recorded as handled
/// in the inbox. Returns the message, or `None` if it is no longer in its
/// stream (then only its reference is dead-lettered).
async fn vet_advisory(
    rt: &Runtime,
    adv: &dlq::MaxDeliveries,
) -> Result<Option<jetstream::message::StreamMessage>, &'static str> {
    let durable = consumer_name(&rt.service, rt.handler);
    if adv.stream != rt.stream || adv.consumer != durable {
        return Err("it names another stream or consumer");
    }
    let mut consumer: jetstream::consumer::PullConsumer = rt
        .js
        .get_consumer_from_stream(&durable, rt.stream)
        .await
        .map_err(|_| "the consumer cannot be read")?;
    let info = consumer
        .info()
        .await
        .map_err(|_| "the consumer cannot be read")?;
    if adv.stream_seq <= info.ack_floor.stream_sequence {
        return Err("the consumer has acknowledged that sequence");
    }
    if adv.stream_seq > info.delivered.stream_sequence {
        return Err("the consumer has not delivered that sequence");
    }
    let filter = info.config.filter_subject.clone();
    let Ok(stream) = rt.js.get_stream(rt.stream).await else {
        return Err("the stream cannot be read");
    };
    let Ok(original) = stream.get_raw_message(adv.stream_seq).await else {
        return Ok(None);
    };
    if !filter.is_empty() && !crate::subject::covers(&filter, &original.subject) {
        return Err("the message is not on the handler's subjects");
    }
    if let (Some(inbox), Some(id)) = (
        &rt.inbox,
        original
            .headers
            .get(crate::headers::CE_ID)
            .and_then(|v| v.as_str().parse::<crate::EventId>().ok()),
    ) && let Ok(Some(record)) = inbox.read(&inbox::key(rt.handler, id)).await
        && record.state == inbox::State::Done
    {
        return Err("the inbox records the event as handled");
    }
    Ok(Some(original))
}

async fn handle_advisory(rt: &Runtime, msg: &jetstream::Message) {
    let adv: dlq::MaxDeliveries = match serde_json::from_slice(&msg.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable MAX_DELIVERIES advisory");
            let _ = msg.ack().await;
            return;
        }
    };
    tracing::Span::current().record("stream_sequence", adv.stream_seq);
    let original = match vet_advisory(rt, &adv).await {
        Ok(original) => original,
        Err(why) => {
            tracing::warn!(
                service = %rt.service,
                handler = rt.handler,
                stream = %adv.stream,
                consumer = %adv.consumer,
                stream_sequence = adv.stream_seq,
                why,
                "ignored a MAX_DELIVERIES advisory that does not match this handler's consumer"
            );
            let _ = msg.ack().await;
            return;
        }
    };
    let (subject, headers, payload, detail) = match &original {
        Some(m) => (
            m.subject.to_string(),
            Some(&m.headers),
            m.payload.clone(),
            "the last allowed delivery ended without a verdict (the process stopped, or ack_wait ran out)".to_owned(),
        ),
        None => (
            String::new(),
            None,
            bytes::Bytes::new(),
            "the last allowed delivery ended without a verdict, and the message is no longer in its stream".to_owned(),
        ),
    };
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason: Reason::DeliveryLost,
        detail,
        deliveries: adv.deliveries,
        stream: rt.stream,
        sequence: adv.stream_seq,
        subject: &subject,
    };
    match send_letter(rt, &letter, headers, payload).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            let header = |name: &str| {
                headers
                    .and_then(|h| h.get(name))
                    .map_or("-", |v| v.as_str())
            };
            tracing::warn!(
                service = %rt.service,
                handler = %rt.handler,
                event_type = %header(crate::headers::CE_TYPE),
                event_id = %header(crate::headers::CE_ID),
                subject = %subject,
                attempt = adv.deliveries,
                stream_sequence = adv.stream_seq,
                "dead-lettered an event whose last delivery was lost"
            );
            let _ = msg.ack().await;
        }
        Err(e) => {
            tracing::error!(
                service = %rt.service,
                handler = rt.handler,
                subject = %subject,
                attempt = adv.deliveries,
                stream_sequence = adv.stream_seq,
                error = %e,
                "cannot dead-letter a lost delivery; will retry"
            );
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}
