//! The verdict on one event: emit, record, ack — or dead-letter.

use std::sync::atomic::Ordering;

use async_nats::jetstream::{self, AckKind};

use crate::dlq::{self, Letter, Reason};
use crate::handler::AfterEmit;
use crate::topology::StreamError;

use super::fault::FaultPoint;
use super::{Runtime, Settled, about};

pub(super) enum Done {
    /// Acked.
    Finished,
    /// Stopped at a fault point, without a verdict.
    Stopped,
    /// No retry can succeed.
    DeadLetter(Reason, String),
    /// Try again later.
    Retry(String),
}

/// After `Ok`: publish every emission (awaiting each PubAck), record the
/// event in the inbox, then ack.
pub(super) async fn emit_record_ack(
    rt: &Runtime,
    msg: &jetstream::Message,
    (id, time): (crate::EventId, time::OffsetDateTime),
    (outgoing, after_emit): (
        Vec<Result<crate::publish::Outgoing, crate::PublishError>>,
        Vec<AfterEmit>,
    ),
    key: &str,
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
        return Done::Stopped;
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
            return Done::Stopped;
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
        return Done::Stopped;
    }
    // The emissions are stored: what waited for that (an outbox's rows to
    // delete) runs now, before the ack.
    for hook in after_emit {
        hook().await;
    }
    // Not recorded, so not acked: it comes back, and its emissions (same
    // ids) are deduplicated.
    if let Some(inbox) = &rt.inbox {
        match Box::pin(inbox.done(key)).await {
            Ok(0) => {}
            Ok(conflicts) => {
                rt.stats
                    .inbox_conflicts
                    .fetch_add(u64::from(conflicts), Ordering::Relaxed);
            }
            Err(e) => {
                return Done::Retry(format!("recording the event in the inbox failed: {e}"));
            }
        }
    }
    if fault(FaultPoint::AfterRecord) {
        return Done::Stopped;
    }
    if let Err(e) = msg.ack().await {
        about!(warn, rt, msg, error = %e, "ack failed; the event will be redelivered and skipped by the inbox");
    }
    rt.stats.handled.fetch_add(1, Ordering::Relaxed);
    rt.metrics.handled.increment(1);
    // The event's age end to end, from its `ce-time` (clocks permitting).
    let age = time::OffsetDateTime::now_utc() - time;
    rt.metrics.age.record(age.as_seconds_f64().max(0.0));
    tracing::debug!(emitted, "handled");
    Done::Finished
}

/// After a failed attempt that will be retried: the retry note over the
/// key (at its revision, the claim's if this instance holds one), else the
/// claim released.
pub(super) async fn note_retry(
    rt: &Runtime,
    key: &str,
    (revision, claim): (u64, Option<u64>),
    delivered: crate::inbox::Delivered,
    delay: std::time::Duration,
    error: &str,
) {
    let Some(inbox) = &rt.inbox else { return };
    let ttl = crate::inbox::claim_ttl(rt.ack_wait());
    if !Box::pin(inbox.note_retry(key, revision, delivered, delay, error, ttl)).await {
        release(rt, key, claim).await;
    }
}

pub(super) async fn release(rt: &Runtime, key: &str, claim: Option<u64>) {
    if let (Some(inbox), Some(rev)) = (&rt.inbox, claim) {
        Box::pin(inbox.release(key, rev)).await;
    }
}

/// Copies the message to the dead-letter stream, then terminates it. If the
/// copy fails the message is nak'd instead, so it comes back: never lost.
/// Boxed: a rare path that would otherwise enlarge every event's future.
pub(super) fn dead_letter<'a>(
    rt: &'a Runtime,
    msg: &'a jetstream::Message,
    reason: Reason,
    detail: &'a str,
    attempt: u32,
    seq: u64,
) -> std::pin::Pin<Box<dyn Future<Output = Settled> + Send + 'a>> {
    Box::pin(dead_letter_now(rt, msg, reason, detail, attempt, seq))
}

pub(super) async fn dead_letter_now(
    rt: &Runtime,
    msg: &jetstream::Message,
    reason: Reason,
    detail: &str,
    attempt: u32,
    seq: u64,
) -> Settled {
    let (stream, sequence) = rt.origin_of(msg.headers.as_ref(), seq);
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason,
        detail: detail.to_owned(),
        deliveries: u64::from(attempt),
        stream: &stream,
        sequence,
        subject: &msg.subject,
    };
    match send_letter(rt, &letter, msg.headers.as_ref(), msg.payload.clone()).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            rt.metrics.dead_lettered.increment(1);
            // `+TERM <reason>` shows the reason in JetStream's MSG_TERMINATED advisory.
            if let Some(reply) = &msg.reply {
                let term = format!("+TERM {}", reason.as_str());
                if let Err(e) = rt.client.publish(reply.clone(), term.into()).await {
                    about!(warn, rt, msg, error = %e, "terminating the dead-lettered message failed");
                }
            }
            Settled::Gone
        }
        Err(e) => {
            about!(error, rt, msg, error = %e, "cannot write to the dead-letter stream; the event will come back");
            let _ = msg
                .ack_with(AckKind::Nak(Some(rt.options.delay_after(attempt))))
                .await;
            Settled::Back
        }
    }
}

pub(super) async fn send_letter(
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
