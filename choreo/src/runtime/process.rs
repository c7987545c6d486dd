//! Handling one event: decode, look it up in the inbox (waiting on another
//! invocation's claim), run the handler under the panic guard and its
//! timeout, then settle (see `settle`).

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use futures::future::{AbortHandle, Abortable, Aborted};
use tracing::Instrument;

use crate::dlq::Reason;
use crate::event::Event;
use crate::handler::{Context, Delivery, Handler};
use crate::inbox::{self, Inbox, InboxError, Sighting, Verdict};
use crate::wire::envelope::Envelope;

use super::settle::{Done, dead_letter, emit_record_ack, note_retry, release};
use super::watchdog::KeyState;
use super::{Runtime, Seen, Settled, Typed, about, panic_message};

pub(super) async fn process<H: Handler>(
    handler: Arc<Typed<H>>,
    msg: jetstream::Message,
    (attempt, stream_sequence): (u32, u64),
    seen: Seen,
    rt: Arc<Runtime>,
) -> Settled {
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
    // A delivery below the ack floor this instance knew comes from a
    // rewind: read the replay marker now rather than at the next tick.
    let mut replay = rt.replay.covers(stream_sequence);
    // An ordered handler's replay sends copies into its partitions, each
    // saying so (see `admin::requeue`).
    if rt.partition.is_some() {
        replay = replay_copy(msg.headers.as_ref()).is_some();
    } else if !replay && stream_sequence > 0 && stream_sequence <= rt.live.ack_floor() {
        rt.follow_replay().await;
        replay = rt.replay.covers(stream_sequence);
    }
    let delivery = Delivery {
        subject,
        attempt,
        stream_sequence,
        stored_at: msg.info().ok().map(|i| i.published),
        replay,
    };
    // The handler's own code runs under its guard inside; this one catches
    // a panic in choreo's part (or a fault hook), so it is counted and
    // logged with the event's identity. The event then has no verdict from
    // this instance and is redelivered after `ack_wait`.
    let handled = AssertUnwindSafe(handle::<H>(&handler.0, &msg, seen, &rt, delivery))
        .catch_unwind()
        .instrument(span)
        .await;
    match handled {
        Ok(settled) => settled,
        Err(panic) => {
            rt.stats.task_panics.fetch_add(1, Ordering::Relaxed);
            about!(
                error,
                rt,
                &msg,
                panic = %panic_message(&*panic),
                "handling the event panicked outside the handler's guard; it will be redelivered after ack_wait"
            );
            Settled::Back
        }
    }
}

/// The original stream and sequence a replay's copy names in its
/// `choreo-replay` header (`<service>.<handler> <stream> <sequence>`).
pub(super) fn replay_copy(headers: Option<&async_nats::HeaderMap>) -> Option<(String, u64)> {
    // A static name: no allocation for the look-up on every ordered event.
    const NAME: async_nats::HeaderName =
        async_nats::HeaderName::from_static(crate::wire::headers::CHOREO_REPLAY);
    let v = headers?.get(NAME)?.as_str();
    let mut t = v.split_whitespace().skip(1);
    Some((t.next()?.to_owned(), t.next()?.parse().ok()?))
}

/// Decode → look up → run (kept alive by the watchdog) → emit → record →
/// ack, or nak / dead-letter. Every path ends with a verdict, except a fault
/// point.
pub(super) async fn handle<H: Handler>(
    handler: &H,
    msg: &jetstream::Message,
    seen: Seen,
    rt: &Runtime,
    delivery: Delivery,
) -> Settled {
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
            return dead_letter(rt, msg, Reason::UndecodablePayload, &detail, attempt, seq).await;
        }
        Ok(Err(e)) => {
            about!(warn, rt, msg, error = %e, "cannot decode the event; dead-lettering it");
            return dead_letter(
                rt,
                msg,
                Reason::from_decode(&e),
                &e.to_string(),
                attempt,
                seq,
            )
            .await;
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
    let time = meta.time();
    // The inbox key, made only where there is an inbox (the calls below
    // that take `key` read it only then).
    let inbox_key = rt.inbox.as_ref().map(|_| inbox::key(rt.handler, id));
    let key = inbox_key.as_deref().unwrap_or_default();
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
            let found = look_up(rt, inbox, msg, key, seen, at).await;
            inbox.note_look_up(found.is_ok());
            match found {
                Ok(Some(rev)) => revision = rev,
                Ok(None) => return skip(rt, msg).await,
                Err(e) => return inbox_unavailable(rt, msg, attempt, &e).await,
            }
        }
        // Refused only for a key already registered, so only with an inbox.
        if let Some(entered) = rt.watchdog.enter(
            msg.reply.clone(),
            inbox_key.as_deref(),
            revision,
            inbox::Delivered {
                stream_seq: seq,
                attempt,
                of: rt.max_deliver(),
            },
            abort.clone(),
        ) {
            break entered;
        }
        if !waited {
            rt.stats.waited.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                "another copy of this event is being handled here; waiting for its outcome"
            );
            waited = true;
        }
        Box::pin(wait_while_running(rt, msg, key)).await;
    };
    let ctx = Context::new(
        meta.clone(),
        delivery,
        rt.service.clone(),
        rt.handler,
        rt.handler_id.clone(),
        rt.states.clone(),
        handler.emits(),
    );
    // Everything the handler's code does runs under the panic guard: its
    // extractors and a hand-written `call` as well as the future. The
    // watchdog aborts it at its timeout.
    // A turn to run: `concurrency` invocations at once (events pulled into
    // the headroom wait here, watched); the timeout counts from the turn.
    // (The semaphore is never closed.)
    let _turn = rt.running.acquire().await.ok();
    entered.begin();
    let guarded = AssertUnwindSafe(async { handler.call(env, &ctx).await }).catch_unwind();
    let guarded = std::pin::pin!(Abortable::new(guarded, abort_registration));
    let result = RequeuedPolls::new(guarded).await;
    let KeyState { revision, claimed } = entered.finish();
    let claim = claimed.then_some(revision);
    let outgoing = ctx.take_outgoing();
    let mut reason = Reason::MaxDeliverExceeded;
    let mut retry_after = None;
    let error = match result {
        Err(Aborted) => {
            rt.stats.timed_out.fetch_add(1, Ordering::Relaxed);
            rt.metrics.timed_out.increment(1);
            reason = Reason::Timeout;
            format!("the handler timed out after {:?}", rt.options.timeout)
        }
        Ok(result) => match result {
            Ok(Ok(())) if ctx.is_put_off() && outgoing.is_empty() => {
                release(rt, key, claim).await;
                if let Err(e) = msg.ack().await {
                    about!(warn, rt, msg, error = %e, "ack failed; the event will be redelivered and put off again");
                }
                return Settled::Gone;
            }
            Ok(Ok(())) => {
                match emit_record_ack(rt, msg, (id, time), (outgoing, ctx.take_after_emit()), key)
                    .await
                {
                    Done::Finished => return Settled::Gone,
                    Done::Stopped => return Settled::Back,
                    Done::DeadLetter(reason, detail) => {
                        release(rt, key, claim).await;
                        return dead_letter(rt, msg, reason, &detail, attempt, seq).await;
                    }
                    Done::Retry(e) => e,
                }
            }
            Ok(Err(e)) if e.is_permanent() => {
                about!(warn, rt, msg, error = %e, "handler failed permanently; dead-lettering the event");
                release(rt, key, claim).await;
                return dead_letter(
                    rt,
                    msg,
                    Reason::PermanentError,
                    &e.to_string(),
                    attempt,
                    seq,
                )
                .await;
            }
            Ok(Err(e)) => {
                retry_after = e.retry_delay();
                e.to_string()
            }
            Err(panic) => {
                rt.stats.panicked.fetch_add(1, Ordering::Relaxed);
                format!("handler panicked: {}", panic_message(&*panic))
            }
        },
    };
    if attempt >= rt.max_deliver() {
        release(rt, key, claim).await;
        about!(warn, rt, msg, error = %error, "failed on the last allowed delivery; dead-lettering the event");
        dead_letter(rt, msg, reason, &error, attempt, seq).await
    } else {
        // The handler's own delay for this once, else the backoff.
        let delay = retry_after.unwrap_or_else(|| rt.options.delay_after(attempt));
        let delivered = inbox::Delivered {
            stream_seq: seq,
            attempt,
            of: rt.max_deliver(),
        };
        note_retry(rt, key, (revision, claim), delivered, delay, &error).await;
        tracing::info!(error = %error, retry_in = ?delay, "handler failed; will retry");
        rt.stats.retried.fetch_add(1, Ordering::Relaxed);
        rt.metrics.retried.increment(1);
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
            about!(warn, rt, msg, error = %e, "nak failed; the event will be redelivered after ack_wait");
        }
        Settled::Back
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
pub(super) struct RequeuedPolls<F> {
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
pub(super) async fn wait_while_running(rt: &Runtime, msg: &jetstream::Message, key: &str) {
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
pub(super) async fn skip(rt: &Runtime, msg: &jetstream::Message) -> Settled {
    rt.stats.skipped.fetch_add(1, Ordering::Relaxed);
    rt.metrics.skipped.increment(1);
    tracing::info!("already handled (inbox); acked and skipped");
    if let Err(e) = msg.ack().await {
        about!(warn, rt, msg, error = %e, "ack failed; the event will be redelivered and skipped again");
    }
    Settled::Gone
}

/// Naks a delivery whose inbox key cannot be read: it comes back later.
pub(super) async fn inbox_unavailable(
    rt: &Runtime,
    msg: &jetstream::Message,
    attempt: u32,
    e: &InboxError,
) -> Settled {
    about!(warn, rt, msg, error = %e, "inbox unavailable; the event will come back");
    let _ = msg
        .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
        .await;
    Settled::Back
}

/// [`look_up_or_wait`], without a wait (or an allocation) when the pull
/// loop's batched read already settled it.
pub(super) async fn look_up(
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
pub(super) async fn look_up_or_wait(
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
