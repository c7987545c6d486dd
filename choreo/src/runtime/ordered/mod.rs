//! The loop of one partition of an ordered handler.
//!
//! The partition's durable has a pinned priority group: the server sends
//! its events, in stream order and up to `WINDOW` unacknowledged, to one
//! instance at a time, the one it pinned. That instance keeps a queue per
//! key (the ordering fields' tokens) and runs the first event of each key
//! only: one event of a key at a time, in stream order, while different keys
//! of the partition run in parallel. A failing event that will be retried
//! stays at the head of its key's queue (`Expected`) until its redelivery
//! comes back and succeeds, or is dead-lettered; the key's later events
//! wait behind it, other keys go on.
//!
//! **Taking a partition over.** When the pin moves here (the holder died,
//! stopped or released it), the events the last holder had not acknowledged
//! are still in the work queue: every event up to the consumer's
//! `delivered` sequence that is still stored. Before running anything of
//! the new pin, this loop reads those and puts them at the head of their
//! keys' queues as `Expected`; the server redelivers them here after their
//! `ack_wait`, or the last holder finishes them (they leave the stream,
//! which the once-a-second check sees). So no key's later event overtakes
//! an earlier one across the move.
//!
//! **Sharing.** Each instance asks for partitions it does not hold only
//! while it holds fewer than its fair share, `partitions / instances`
//! rounded up (instances: the live ones in the registry). An instance
//! holding more unpins the extra partitions at once, and asks for none for
//! a while, so a new instance takes a share within a second or two.
//!
//! **Letting a pin go** (released, or moved by the server): what was
//! delivered here under the old pin still runs here, key by key in order —
//! the next holder's take-over read sees those events and waits for them to
//! leave the stream. Only a key whose head is a retry is dropped at once,
//! with everything behind it: its retry goes to the next holder, and the
//! events behind must not overtake it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use tokio::sync::{Semaphore, watch};

use crate::inbox;

use super::requests::{Pinned, Pulled, Puller, Slot};
use super::upkeep::refresh_consumer;
use super::{Erased, Runtime, Settled, Stopped, delivery_and_pending, delivery_of, pull, watchdog};

mod queues;
mod share;
mod take_over;

use queues::{Arrival, Entry, Instant, Queues, key_of_subject, queue_all};
pub(crate) use share::{Share, follow_instances};
use take_over::take_over;

/// The longest a pinned request waits at the server, and so the longest a
/// release waits for this instance's requests to end.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// What the loop of one partition needs besides the runtime.
pub(crate) struct Pinning {
    pub(crate) share: Arc<Share>,
    /// The JetStream API prefix, for the pinned requests' subject.
    pub(crate) api_prefix: String,
}

pub(crate) async fn ordered_loop(
    handler: Arc<dyn Erased>,
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    pinning: Pinning,
) -> Result<(), Stopped> {
    let Some(part) = rt.partition.as_ref() else {
        return Ok(());
    };
    let share = pinning.share;
    let filter = format!(
        "{}.>",
        crate::topology::ordered::partition_prefix(&rt.service, rt.handler, part.part)
    );
    let permits = Arc::new(Semaphore::new(crate::topology::ordered::WINDOW));
    let _keeper = watchdog::Keeper::start(rt.clone());
    // Below the pin timeout (the consumer's `ack_wait`): a holder that
    // keeps asking keeps its pin. At most 2 s: a release waits for the
    // holder's requests to end.
    let expires = (rt.ack_wait() / 3).clamp(Duration::from_millis(500), RELEASE_WAIT);
    let pinned = || Pinned {
        next_subject: format!(
            "{}.CONSUMER.MSG.NEXT.{}.{}",
            pinning.api_prefix, rt.consumer_stream, rt.durable
        ),
        group: crate::topology::ordered::GROUP,
        pin: None,
    };
    let max_request = crate::topology::ordered::WINDOW;
    let Some(puller) = pull::subscribe(&rt, &consumer, &permits, max_request, &mut stop).await
    else {
        return Ok(());
    };
    let mut puller = puller.pinned(pinned(), expires);
    let queue = match rt.js.get_stream_no_info(&*rt.consumer_stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(service = %rt.service, handler = rt.handler, error = %e, "cannot name the partition stream");
            return Ok(());
        }
    };
    let mut q = Queues::default();
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let config_every = rt.options.ack_wait.as_secs().clamp(1, 5);
    let mut ticks = 0_u64;
    let mut permits_free = puller.wait_for_permits();
    let mut waiting_for = puller.threshold();
    let mut failure = None;
    // The pin this instance let go of last: what still arrives under it
    // runs here, but is no new pin.
    let mut released: Option<String> = None;
    // Since when this instance stopped asking, to release the partition
    // once its requests at the server ended (an unpin while one waits
    // would pin that request again).
    let mut releasing: Option<Instant> = None;
    // After a release, not asking for a while, so that another instance
    // takes the partition.
    let mut quiet_until = Instant::now();
    loop {
        if failure.is_some() {
            break;
        }
        let holds = pin_of(&puller).is_some();
        let asking = if holds {
            releasing.is_none()
        } else {
            share.wants_more() && Instant::now() >= quiet_until
        };
        let first = tokio::select! {
            _ = stop.changed() => break,
            permit = &mut permits_free, if asking => {
                if let Err(e) = puller.send(permit).await {
                    tracing::warn!(service = %rt.service, handler = rt.handler, error = %e, "cannot request events; retrying in 1s");
                    tokio::select! {
                        _ = stop.changed() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                pull::rearm(&puller, &mut permits_free, &mut waiting_for, true);
                continue;
            }
            Some(done) = q.running.join_next(), if !q.running.is_empty() => {
                finished(&rt, &mut q, done);
                while let Some(done) = q.running.try_join_next() {
                    finished(&rt, &mut q, done);
                }
                start_ready(&handler, &rt, &mut q).await;
                continue;
            }
            _ = housekeeping.tick() => {
                ticks += 1;
                failure = pull::upkeep(&handler, &rt, &mut puller, &mut stop, ticks.is_multiple_of(config_every)).await.err();
                pull::rearm(&puller, &mut permits_free, &mut waiting_for, false);
                keep_waiting_alive(&rt, &mut q).await;
                clear_gone(&rt, &queue, &mut q).await;
                start_ready(&handler, &rt, &mut q).await;
                // More than a fair share: the extra partitions go, each once
                // its requests at the server have ended.
                if holds && releasing.is_none() && share.let_one_go() {
                    tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, held = share.held(), fair = share.fair(), "holding more partitions than a fair share; releasing this one");
                    releasing = Some(Instant::now());
                }
                if let Some(since) = releasing
                    && (puller.outstanding() == 0 || since.elapsed() > expires + Duration::from_millis(500))
                {
                    if let Err(e) = queue.unpin_consumer(&rt.durable, crate::topology::ordered::GROUP).await {
                        tracing::debug!(service = %rt.service, handler = rt.handler, error = %e, "unpinning failed; the pin times out instead");
                    }
                    released = lose_pin(&mut puller, &share, &mut q);
                    puller.forget();
                    releasing = None;
                    share.released_one();
                    tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, held = share.held(), "released the partition");
                    quiet_until = Instant::now() + expires * 4;
                }
                continue;
            }
            p = puller.next() => p,
        };
        let mut next = Some(first);
        let mut chunk = Vec::new();
        while let Some(pulled) = next.take() {
            match pulled {
                Pulled::Event(msg, slot) => {
                    if let Some(pin) = msg.headers.as_ref().and_then(|h| h.get("Nats-Pin-Id"))
                        && pin_of(&puller) != Some(pin.as_str())
                    {
                        // A new pin: what came under the old one first.
                        queue_all(&rt, &mut q, std::mem::take(&mut chunk)).await;
                    }
                    chunk.extend(
                        arrived(
                            &rt,
                            &consumer,
                            &queue,
                            &filter,
                            (&mut puller, released.as_deref()),
                            (&share, &mut stop),
                            &mut q,
                            msg,
                            slot,
                        )
                        .await,
                    );
                }
                Pulled::Status => {}
                Pulled::Unpinned => {
                    if releasing.take().is_some() {
                        share.released_one();
                    }
                    if let Some(old) = lose_pin(&mut puller, &share, &mut q) {
                        tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, "the partition's pin moved to another instance");
                        released = Some(old);
                    }
                }
                Pulled::ConsumerGone(why) => {
                    failure = refresh_consumer(&handler, &rt, &mut puller, Some(&why), &mut stop)
                        .await
                        .err();
                    break;
                }
                Pulled::Ended => {
                    tracing::warn!(service = %rt.service, handler = rt.handler, "the pull subscription ended; subscribing again");
                    if let Ok(p) = puller.again().await {
                        released = lose_pin(&mut puller, &share, &mut q);
                        if releasing.take().is_some() {
                            share.released_one();
                        }
                        puller = p;
                    }
                    break;
                }
            }
            if chunk.len() < inbox::READ_BATCH {
                next = puller.next_now();
            }
        }
        queue_all(&rt, &mut q, chunk).await;
        start_ready(&handler, &rt, &mut q).await;
        pull::rearm(&puller, &mut permits_free, &mut waiting_for, false);
    }
    // Shutdown: no more requests; what was sent still arrives. The events
    // here run, key by key in order, within the grace period; then the pin
    // is released so another instance goes on at once.
    puller.drain().await;
    let drained = tokio::time::timeout(grace, async {
        let mut ended = false;
        loop {
            if ended && q.idle() {
                break;
            }
            tokio::select! {
                Some(done) = q.running.join_next(), if !q.running.is_empty() => {
                    finished(&rt, &mut q, done);
                }
                p = puller.next(), if !ended => match p {
                    Pulled::Event(msg, slot) => {
                        let a = arrived(&rt, &consumer, &queue, &filter, (&mut puller, released.as_deref()), (&share, &mut stop), &mut q, msg, slot).await;
                        queue_all(&rt, &mut q, a.into_iter().collect()).await;
                    }
                    Pulled::Ended => ended = true,
                    _ => {}
                },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if ended && q.running.is_empty() {
                        // Only events of another holder, or retries, are left.
                        clear_gone(&rt, &queue, &mut q).await;
                        if !q.idle() { continue; }
                    }
                }
            }
            start_ready(&handler, &rt, &mut q).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(service = %rt.service, handler = rt.handler, "handlers still running after the grace period were abandoned; their events will be redelivered");
        q.running.abort_all();
    }
    if pin_of(&puller).is_some() {
        let _ = queue
            .unpin_consumer(&rt.durable, crate::topology::ordered::GROUP)
            .await;
        let _ = lose_pin(&mut puller, &share, &mut q);
    }
    if releasing.is_some() {
        share.released_one();
    }
    failure.map_or(Ok(()), Err)
}

fn pin_of(puller: &Puller) -> Option<&str> {
    puller.pinned.as_ref()?.pin.as_deref()
}

/// The pin is gone (moved, or the subscription ended): see
/// [`Queues::let_go`]. Returns the pin this instance held.
fn lose_pin(puller: &mut Puller, share: &Share, q: &mut Queues) -> Option<String> {
    let old = puller.pinned.as_mut().and_then(|p| p.pin.take());
    if old.is_some() {
        share.held.fetch_sub(1, Ordering::Relaxed);
    }
    q.let_go();
    old
}

/// An event arrived: if it brings a new pin, first learn what the last
/// holder left unacknowledged; then it is ready to be queued.
#[allow(clippy::too_many_arguments)]
async fn arrived(
    rt: &Runtime,
    consumer: &jetstream::consumer::PullConsumer,
    queue: &jetstream::stream::Stream<()>,
    filter: &str,
    (puller, released): (&mut Puller, Option<&str>),
    (share, stop): (&Share, &mut watch::Receiver<bool>),
    q: &mut Queues,
    msg: jetstream::Message,
    slot: Slot,
) -> Option<Arrival> {
    let part = rt.partition.as_ref()?;
    let pin = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Pin-Id"))
        .map(|v| v.as_str().to_owned());
    if let (Some(pin), Some(p)) = (pin, puller.pinned.as_mut())
        && p.pin.as_deref() != Some(pin.as_str())
        // Sent before this instance let that pin go: it runs here, and the
        // next holder waits for it.
        && released != Some(pin.as_str())
    {
        if p.pin.replace(pin).is_none() {
            share.held.fetch_add(1, Ordering::Relaxed);
        }
        q.holding = true;
        if !take_over(rt, (consumer, queue, filter), q, &msg, stop).await {
            // Stopping: the event is not run here; it goes back at once.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return None;
        }
        tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, held = share.held(), fair = share.fair(), "holding the partition");
    }
    let (_, seq) = delivery_of(&msg);
    let key = key_of_subject(rt.original_subject(&msg.subject), &part.key_tokens);
    Some(Arrival {
        key,
        seq,
        msg,
        slot,
    })
}

/// Drops expected events that are no longer in the work queue (the last
/// holder acknowledged them, or they were dead-lettered).
async fn clear_gone(rt: &Runtime, queue: &jetstream::stream::Stream<()>, q: &mut Queues) {
    let waiting: Vec<(String, u64, Duration)> = q
        .keys
        .iter()
        .flat_map(|(k, es)| {
            es.iter().filter_map(move |(s, e)| match e {
                Entry::Expected(since) if since.elapsed() >= Duration::from_millis(500) => {
                    Some((k.clone(), *s, since.elapsed()))
                }
                _ => None,
            })
        })
        .collect();
    // Said once, when a key has waited four `ack_wait`s for one event.
    let long = rt.ack_wait() * 4;
    for (key, seq, waited) in waiting {
        match queue.get_raw_message(seq).await {
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                tracing::debug!(service = %rt.service, handler = rt.handler, stream_sequence = seq, "an expected event left the work queue");
                q.settled(key, seq, Settled::Gone, false);
            }
            _ if waited >= long && waited < long + Duration::from_secs(1) => {
                tracing::warn!(service = %rt.service, handler = rt.handler, stream = %rt.consumer_stream, stream_sequence = seq, key = %key, ?waited, "a key waits for an event that has not come back; its later events are held (`choreo status` shows the partition's consumer)");
            }
            _ => {}
        }
    }
}

/// Tells the server that events waiting here behind their key are alive,
/// so it does not send them again after `ack_wait`.
async fn keep_waiting_alive(rt: &Runtime, q: &mut Queues) {
    let every = rt.ack_wait() / 3;
    for es in q.keys.values_mut() {
        for e in es.values_mut() {
            if let Entry::Here(w) = e
                && w.alive.elapsed() >= every
            {
                let _ = w.msg.ack_with(AckKind::Progress).await;
                w.alive = Instant::now();
            }
        }
    }
}

fn finished(
    rt: &Runtime,
    q: &mut Queues,
    done: Result<(String, u64, Settled, bool), tokio::task::JoinError>,
) {
    match done {
        Ok((key, seq, settled, copy)) => q.settled(key, seq, settled, copy),
        Err(e) => pull::count_task_failure(rt, Err(e)),
    }
}

/// Runs every key's head that is here, and the copies of running events.
async fn start_ready(handler: &Arc<dyn Erased>, rt: &Arc<Runtime>, q: &mut Queues) {
    let ready = q.ready();
    let copies = std::mem::take(&mut q.copies);
    let runs = ready
        .into_iter()
        .map(|r| (r, false))
        .chain(copies.into_iter().map(|c| (c, true)));
    for ((key, seq, msg, slot, seen), copy) in runs {
        rt.metrics.consumed.increment(1);
        let (attempt, sequence, pending) = delivery_and_pending(&msg);
        #[allow(clippy::cast_precision_loss)]
        rt.metrics.lag.set(pending as f64);
        let started = std::time::Instant::now();
        let mut msg = msg;
        let original = rt.original_subject(&msg.message.subject).to_owned();
        msg.message.subject = original.into();
        let fut = handler
            .clone()
            .process(msg, (attempt, sequence), seen, rt.clone());
        let rt = rt.clone();
        q.running.spawn(async move {
            let settled = AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or(Settled::Back);
            rt.metrics.duration.record(started.elapsed());
            drop(slot);
            (key, seq, settled, copy)
        });
    }
}
