//! Taking a partition over: reading what the last holder left before
//! running anything under the new pin, and waiting (not going on) while
//! that read fails.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio::sync::watch;

use super::queues::{Instant, Queues, key_of_subject};
use crate::runtime::{FaultPoint, Runtime, event_id_of};

/// How long a new holder waits between two tries at reading what the last
/// holder left, at most.
const TAKE_OVER_RETRY_MAX: Duration = Duration::from_secs(2);

/// Puts every event the consumer delivered and nobody acknowledged yet at
/// the head of its key's queue, as expected. A read that fails is tried
/// again (250 ms, doubling to 2 s) until it succeeds or the service stops:
/// going on without it would let a key's later events overtake the ones
/// the last holder left. Meanwhile the arriving event is kept alive with
/// in-progress acks, and a warning names the partition at once and then
/// every 30 s. Returns `false` if the service stopped first.
pub(super) async fn take_over(
    rt: &Runtime,
    (consumer, queue, filter): (
        &jetstream::consumer::PullConsumer,
        &jetstream::stream::Stream<()>,
        &str,
    ),
    q: &mut Queues,
    arrival: &jetstream::Message,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let Some(part) = rt.partition.as_ref() else {
        return true;
    };
    let started = Instant::now();
    let mut warned: Option<Instant> = None;
    let mut failures = 0_u32;
    let mut alive = Instant::now();
    loop {
        if *stop.borrow() {
            return false;
        }
        match read_left(rt, consumer, queue, filter, arrival).await {
            Ok(left) => {
                for (key, seq) in left {
                    if !q.knows(&key, seq) {
                        q.left.push((key, seq));
                    }
                }
                if failures > 0 {
                    tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, failures, waited = ?started.elapsed(), "read what the last holder left; the partition goes on");
                }
                return true;
            }
            Err(e) => {
                failures += 1;
                rt.stats.take_over_retries.fetch_add(1, Ordering::Relaxed);
                if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(30)) {
                    tracing::warn!(service = %rt.service, handler = rt.handler, partition = part.part, failures, waited = ?started.elapsed(), error = %e, "cannot read what the last holder left; the partition waits and tries again, so no key's later events overtake the ones it left");
                    warned = Some(Instant::now());
                }
            }
        }
        if alive.elapsed() >= rt.ack_wait() / 3 {
            let _ = arrival.ack_with(AckKind::Progress).await;
            alive = Instant::now();
        }
        let wait = (Duration::from_millis(250) * 2_u32.saturating_pow(failures.min(4) - 1))
            .min(TAKE_OVER_RETRY_MAX);
        tokio::select! {
            _ = stop.changed() => return false,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The events up to the consumer's `delivered` sequence still in the work
/// queue (at most four windows' worth), by key.
async fn read_left(
    rt: &Runtime,
    consumer: &jetstream::consumer::PullConsumer,
    queue: &jetstream::stream::Stream<()>,
    filter: &str,
    arrival: &jetstream::Message,
) -> Result<Vec<(String, u64)>, crate::nats::Source> {
    let Some(part) = rt.partition.as_ref() else {
        return Ok(Vec::new());
    };
    if let Some(fault) = &rt.fault
        && fault(
            FaultPoint::TakeOverRead,
            event_id_of(arrival)
                .parse()
                .unwrap_or_else(|_| crate::event::EventId::from_parts(&[b"take-over"])),
        )
    {
        return Err(crate::nats::message(
            "the take-over read failed (a fault hook)",
        ));
    }
    let mut consumer = consumer.clone();
    let info = consumer.info().await.map_err(crate::nats::source)?.clone();
    let delivered = info.delivered.stream_sequence;
    let mut seq = info.ack_floor.stream_sequence + 1;
    let mut left = Vec::new();
    while seq <= delivered && left.len() <= 4 * crate::topology::ordered::WINDOW {
        match queue.get_first_raw_message_by_subject(filter, seq).await {
            Ok(m) if m.sequence <= delivered => {
                let key = key_of_subject(rt.original_subject(&m.subject), &part.key_tokens);
                left.push((key, m.sequence));
                seq = m.sequence + 1;
            }
            Ok(_) => break,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(crate::nats::source(e)),
        }
    }
    Ok(left)
}
