//! The pull loop of one handler: asks for events as permits free up (see
//! `requests`), reads a pulled batch's inbox keys with one request, and
//! spawns one task per event; on shutdown, drains and lets them finish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::inbox;

use super::requests::{self, PermitWait, Pulled, Puller, Slot};
use super::upkeep::{check_inbox, follow_consumer, refresh_consumer};
use super::{Erased, Runtime, Seen, Stopped, delivery_and_pending, panic_message, watchdog};

pub(crate) async fn pull_loop(
    handler: Arc<dyn Erased>,
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), Stopped> {
    // Events pulled at most: the handler's concurrency, and a headroom that
    // waits for turns (watched) so requests can be larger and fewer.
    let permits = Arc::new(Semaphore::new(
        rt.options.concurrency + requests::headroom(rt.options.concurrency),
    ));
    let mut running = JoinSet::new();
    let _keeper = watchdog::Keeper::start(rt.clone());
    let max_request = rt.options.concurrency.clamp(1, 500);
    let Some(mut puller) = subscribe(&rt, &consumer, &permits, max_request, &mut stop).await else {
        return Ok(());
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
    let mut permits_free = puller.wait_for_permits();
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
                rearm(&puller, &mut permits_free, &mut waiting_for, true);
                continue;
            }
            _ = housekeeping.tick() => {
                ticks += 1;
                failure = upkeep(&handler, &rt, &mut puller, &mut stop, ticks.is_multiple_of(config_every)).await.err();
                rearm(&puller, &mut permits_free, &mut waiting_for, false);
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
                Pulled::Status | Pulled::Unpinned => {}
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
                    if let Ok(p) = puller.again().await {
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
        rearm(&puller, &mut permits_free, &mut waiting_for, false);
    }
    // Shutdown: no more requests. What the server sent before it saw the
    // unsubscribe still arrives, and runs: it was pulled with a permit.
    puller.drain().await;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), puller.next()).await {
            Ok(Pulled::Event(msg, slot)) => {
                spawn(&handler, &rt, &mut running, msg, Seen::NotRead, slot)
            }
            Ok(Pulled::Status | Pulled::ConsumerGone(_) | Pulled::Unpinned) => {}
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

/// Subscribes for a handler's pulled events, retrying each second until
/// it can; `None` if the service stops meanwhile.
pub(super) async fn subscribe(
    rt: &Runtime,
    consumer: &jetstream::consumer::PullConsumer,
    permits: &Arc<Semaphore>,
    max_request: usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<Puller> {
    loop {
        match Puller::new(
            rt.js.clone(),
            consumer.clone(),
            permits.clone(),
            max_request,
        )
        .await
        {
            Ok(p) => return Some(p),
            Err(e) => {
                tracing::warn!(service = %rt.service, handler = rt.handler, error = %e, "cannot subscribe for pulled events; retrying in 1s");
                tokio::select! {
                    _ = stop.changed() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// The once-a-second checks of a pull loop: silent pull requests (the
/// consumer may be gone), a missing inbox, and with `slow` the consumer's
/// settings on the server and the replay marker. An error stops the
/// service.
pub(super) async fn upkeep(
    handler: &Arc<dyn Erased>,
    rt: &Runtime,
    puller: &mut Puller,
    stop: &mut watch::Receiver<bool>,
    slow: bool,
) -> Result<(), Stopped> {
    if puller.check_silence() {
        tracing::debug!(service = %rt.service, handler = rt.handler, "pull requests went silent; asking again");
        refresh_consumer(handler, rt, puller, None, stop).await?;
    }
    if rt
        .inbox
        .as_ref()
        .is_some_and(|i| i.troubled_for().is_some())
    {
        check_inbox(rt).await?;
    }
    if slow {
        follow_consumer(rt, puller.consumer()).await;
        rt.follow_replay().await;
    }
    Ok(())
}

/// Renews the pending wait for free permits after a request was sent
/// (`sent`), or when fewer outstanding events (requests expired, were
/// forgotten, or filled) call for a smaller threshold than the one it was
/// made with (`waiting_for`).
pub(super) fn rearm(
    puller: &Puller,
    permits_free: &mut PermitWait,
    waiting_for: &mut usize,
    sent: bool,
) {
    if sent || puller.threshold() < *waiting_for {
        *permits_free = puller.wait_for_permits();
        *waiting_for = puller.threshold();
    }
}

/// Runs a pulled batch: reads its inbox keys (with one request when it is
/// large), then spawns one task per event, each holding its permit.
pub(super) async fn spawn_all(
    handler: &Arc<dyn Erased>,
    rt: &Arc<Runtime>,
    running: &mut JoinSet<()>,
    chunk: Vec<(jetstream::Message, Slot)>,
) {
    if chunk.is_empty() {
        return;
    }
    let seen = read_inbox(rt, chunk.iter().map(|(m, _)| m), BATCHED_READ_FROM).await;
    for ((msg, slot), seen) in chunk.into_iter().zip(seen) {
        spawn(handler, rt, running, msg, seen, slot);
    }
}

pub(super) fn spawn(
    handler: &Arc<dyn Erased>,
    rt: &Arc<Runtime>,
    running: &mut JoinSet<()>,
    msg: jetstream::Message,
    seen: Seen,
    slot: Slot,
) {
    rt.metrics.consumed.increment(1);
    // What waits behind this delivery: the lag, at no extra request. Set
    // here, in arrival order, so the gauge holds the newest delivery's
    // count rather than that of whichever task of a batch ran last.
    let (attempt, sequence, pending) = delivery_and_pending(&msg);
    #[allow(clippy::cast_precision_loss)]
    rt.metrics.lag.set(pending as f64);
    let started = std::time::Instant::now();
    let mut msg = msg;
    if rt.partition.is_some() {
        // The handler, its logs and its dead letters see the subject the
        // event was published on.
        let original = rt.original_subject(&msg.message.subject).to_owned();
        msg.message.subject = original.into();
    }
    let fut = handler
        .clone()
        .process(msg, (attempt, sequence), seen, rt.clone());
    let rt = rt.clone();
    running.spawn(async move {
        fut.await;
        rt.metrics.duration.record(started.elapsed());
        drop(slot);
    });
}

/// Collects finished tasks, counting any that panicked.
pub(super) fn reap(rt: &Runtime, running: &mut JoinSet<()>) {
    while let Some(done) = running.try_join_next() {
        count_task_failure(rt, done);
    }
}

/// A task that runs one event panicked outside the handler's panic guard
/// (a bug in choreo, or a fault hook): its event gets no verdict from this
/// instance and is redelivered after `ack_wait`.
pub(super) fn count_task_failure(rt: &Runtime, done: Result<(), tokio::task::JoinError>) {
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

/// The inbox key of a pulled event, from its `ce-id` header; `None` if it
/// has none readable (decoding will dead-letter it).
pub(super) fn key_of(rt: &Runtime, msg: &jetstream::Message) -> Option<String> {
    let id = msg
        .headers
        .as_ref()?
        .get(crate::wire::headers::CE_ID)?
        .as_str();
    let id: crate::EventId = id.parse().ok()?;
    Some(inbox::key(rt.handler, id))
}

/// Below this many events pulled at once, each event reads its own inbox
/// key in its own task (in parallel), so that under light load no event
/// waits in the pull loop for a batch's read.
pub(super) const BATCHED_READ_FROM: usize = 8;

/// Reads the inbox keys of a pulled batch with one request, if it has at
/// least `from` events (see [`BATCHED_READ_FROM`]).
pub(super) async fn read_inbox<'a>(
    rt: &Runtime,
    chunk: impl ExactSizeIterator<Item = &'a jetstream::Message>,
    from: usize,
) -> Vec<Seen> {
    let len = chunk.len();
    let Some(inbox) = rt
        .inbox
        .as_ref()
        .filter(|i| i.reads_in_batches() && len >= from.max(2))
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
            rt.stats
                .inbox_batch_failures
                .fetch_add(1, Ordering::Relaxed);
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
