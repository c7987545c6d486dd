//! Keeping a handler's consumer true to the server: following its
//! settings, recreating it after an operator deletes it, and failing the
//! service when it (or the inbox bucket) cannot come back.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;

use crate::topology::consumer::create_consumer;

use super::requests::Puller;
use super::{Erased, Runtime, Stopped};

/// Reads the consumer back from the server and follows its settings; sets
/// the age of the oldest event it has not finished.
pub(super) async fn follow_consumer(rt: &Runtime, consumer: &jetstream::consumer::PullConsumer) {
    let mut consumer = consumer.clone();
    match consumer.info().await {
        Ok(info) => {
            let (floor, filter) = (
                info.ack_floor.stream_sequence,
                info.config.filter_subject.clone(),
            );
            let waiting = info.num_pending > 0 || info.num_ack_pending > 0;
            if let Some(change) = rt.live.follow(info) {
                tracing::warn!(service = %rt.service, handler = rt.handler, change = %change, "the consumer's settings changed on the server (another version of this service?); following them");
            }
            let age = if waiting {
                oldest_age(rt, floor, &filter).await
            } else {
                Some(0.0)
            };
            if let Some(age) = age {
                rt.metrics.lag_seconds.set(age);
            }
        }
        Err(e) => {
            tracing::debug!(service = %rt.service, handler = rt.handler, error = %e, "cannot read the consumer back")
        }
    }
}

/// How long the first event above the ack floor on `filter` has been
/// stored, seconds (`None` if it cannot be read).
async fn oldest_age(rt: &Runtime, floor: u64, filter: &str) -> Option<f64> {
    let stream = rt.js.get_stream_no_info(&*rt.consumer_stream).await.ok()?;
    let filter = if filter.is_empty() { ">" } else { filter };
    match stream
        .get_first_raw_message_by_subject(filter, floor + 1)
        .await
    {
        Ok(m) => {
            let age = time::OffsetDateTime::now_utc() - m.time;
            Some(age.as_seconds_f64().max(0.0))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Some(0.0)
        }
        Err(_) => None,
    }
}

/// Fails once the inbox has been unreadable for the recovery timeout and
/// its bucket does not exist; an inbox that exists but fails (an election,
/// a slow server) is waited for.
pub(super) async fn check_inbox(rt: &Runtime) -> Result<(), Stopped> {
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
            Err(Stopped::InboxLost {
                bucket: inbox.bucket().to_owned(),
                missing_for: troubled,
            })
        }
        Err(_) => Ok(()),
    }
}

/// Gets the consumer again after its requests went silent or the server
/// said it is gone, recreating it if it no longer exists. Fails once it
/// could not be recreated for the recovery timeout.
pub(super) async fn refresh_consumer(
    handler: &Arc<dyn Erased>,
    rt: &Runtime,
    puller: &mut Puller,
    why: Option<&str>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Stopped> {
    let (_, _, filter) = handler.stream();
    let stream = &*rt.consumer_stream;
    let durable = &*rt.durable;
    if why.is_none()
        && rt
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(durable, stream)
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
    let created = match &rt.partition {
        // A partition of a work queue: what was acknowledged is gone, so a
        // new durable starts at the first event left.
        Some(p) => {
            crate::topology::ordered::create_partition_consumer(
                &rt.js,
                &crate::topology::ordered::Partitioning {
                    service: &rt.service,
                    handler: rt.handler,
                    origin: rt.stream,
                    filter,
                    wildcards: p.wildcards.clone(),
                    partitions: p.partitions,
                },
                p.part,
                &rt.options.consumer_spec(),
            )
            .await
        }
        None => {
            create_consumer(
                &rt.js,
                stream,
                durable,
                filter,
                &rt.options.consumer_spec(),
                rt.handler,
                Some(start_at),
            )
            .await
        }
    };
    let created = match created {
        Ok(c) => Ok(c),
        // Another instance may have recreated it first.
        Err(e) => rt
            .js
            .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(durable, stream)
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
                return Err(Stopped::ConsumerLost {
                    handler: rt.handler.to_owned(),
                    failing_for: since.elapsed(),
                    source: e,
                });
            }
            tracing::warn!(service = %rt.service, handler = rt.handler, consumer = %durable, error = %e, "cannot recreate the consumer; retrying");
            Ok(())
        }
    }
}
