//! Lost last deliveries: JetStream's `MAX_DELIVERIES` advisories, checked
//! against the handler's own consumer, become dead letters.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::dlq::{self, Letter, Reason};
use crate::inbox;

use super::settle::send_letter;
use super::{Runtime, Stopped};

/// Dead-letters events whose last delivery was lost without a verdict, as
/// JetStream's MAX_DELIVERIES advisories report them.
pub(crate) async fn advisory_loop(
    rt: Arc<Runtime>,
    consumer: jetstream::consumer::PullConsumer,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Stopped> {
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
pub(super) async fn vet_advisory(
    rt: &Runtime,
    adv: &dlq::MaxDeliveries,
) -> Result<Option<jetstream::message::StreamMessage>, &'static str> {
    let durable = &*rt.durable;
    if adv.stream != *rt.consumer_stream || adv.consumer != durable {
        return Err("it names another stream or consumer");
    }
    let mut consumer: jetstream::consumer::PullConsumer = rt
        .js
        .get_consumer_from_stream(durable, &*rt.consumer_stream)
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
    let Ok(stream) = rt.js.get_stream(&*rt.consumer_stream).await else {
        return Err("the stream cannot be read");
    };
    let Ok(original) = stream.get_raw_message(adv.stream_seq).await else {
        return Ok(None);
    };
    if !filter.is_empty() && !crate::event::subject::covers(&filter, &original.subject) {
        return Err("the message is not on the handler's subjects");
    }
    if let (Some(inbox), Some(id)) = (
        &rt.inbox,
        original
            .headers
            .get(crate::wire::headers::CE_ID)
            .and_then(|v| v.as_str().parse::<crate::EventId>().ok()),
    ) {
        let key = inbox::key(rt.handler, id);
        // A genuine advisory comes after the last attempt's `ack_wait`
        // passed: nothing runs the event then. A forged one may name an
        // event being handled now, so look twice, half a second apart.
        for look in 0..2 {
            if look > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if rt.watchdog.is_running(&key) {
                return Err("the event is being handled here");
            }
            if let Ok(Some(record)) = inbox.read(&key).await
                && record.state == inbox::State::Done
            {
                return Err("the inbox records the event as handled");
            }
        }
    }
    Ok(Some(original))
}

pub(super) async fn handle_advisory(rt: &Runtime, msg: &jetstream::Message) {
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
            rt.original_subject(&m.subject).to_owned(),
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
    let (stream, sequence) = rt.origin_of(headers, adv.stream_seq);
    let letter = Letter {
        service: &rt.service,
        handler: rt.handler,
        reason: Reason::DeliveryLost,
        detail,
        deliveries: adv.deliveries,
        stream: &stream,
        sequence,
        subject: &subject,
    };
    match send_letter(rt, &letter, headers, payload).await {
        Ok(()) => {
            rt.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            rt.metrics.dead_lettered.increment(1);
            let header = |name: &str| {
                headers
                    .and_then(|h| h.get(name))
                    .map_or("-", |v| v.as_str())
            };
            tracing::warn!(
                service = %rt.service,
                handler = %rt.handler,
                event_type = %header(crate::wire::headers::CE_TYPE),
                event_id = %header(crate::wire::headers::CE_ID),
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
