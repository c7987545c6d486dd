//! Replaying an ordered handler. Its events wait in a work-queue stream
//! that sources them from their own stream into partitions (see
//! `topology::ordered`), and leave it once handled, so there is no durable
//! to rewind. Instead the range is read from the events' stream and
//! published again, in stream order, as copies into the work queue:
//!
//! - the work-queue stream takes copies on `choreo.replay.<service>.<handler>.>`
//!   and partitions them with the very transform it sources with (a
//!   stream-level subject transform, added on the first replay), so a copy
//!   lands in its key's partition and runs in order after what is queued
//!   there;
//! - each copy keeps the event's headers and payload, its own
//!   `Nats-Msg-Id` (`replay:<id>:<replay ms>`: not dropped as a duplicate
//!   of the original, nor of an earlier replay), and `choreo-replay:
//!   <service>.<handler> <stream> <sequence>`, which makes the delivery a
//!   replay (`Context::is_replay`) and names the original for a dead
//!   letter.
//!
//! It needs neither the consumer reset (2.14+) nor a stopped service: only
//! stream subject transforms, which every server choreo supports has
//! (2.10+).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use super::{AdminError, Plan};
use crate::topology::ordered::stream_name;
use crate::wire::headers as h;

/// How many copies are published before their acks are awaited.
const IN_FLIGHT: usize = 256;

/// The subject prefix an ordered handler's work queue takes copies on.
fn replay_prefix(service: &str, handler: &str) -> String {
    format!("choreo.replay.{service}.{handler}")
}

/// Copies `plan`'s range into the handler's partitions; returns how many.
pub(super) async fn requeue(
    js: &jetstream::Context,
    plan: &Plan,
    run_ms: u64,
) -> Result<u64, AdminError> {
    let what = format!("a replay of {}.{}", plan.service, plan.handler);
    let fail = |e: &dyn std::fmt::Display| AdminError::bad_request(&what, e.to_string());
    let prefix = replay_prefix(&plan.service, &plan.handler);
    take_copies(js, plan, &prefix).await.map_err(|e| fail(&e))?;
    let origin = js
        .get_stream_no_info(&plan.stream)
        .await
        .map_err(|e| fail(&e))?;
    let reader = origin
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: plan.filter.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: plan.from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| fail(&e))?;
    let mut msgs = reader.messages().await.map_err(|e| fail(&e))?;
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut copied = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(1), msgs.next()).await {
        let Ok(info) = m.info() else { break };
        let (seq, pending) = (info.stream_sequence, info.pending);
        if seq > plan.until {
            break;
        }
        let mut headers = m
            .headers
            .as_ref()
            .map_or_else(async_nats::HeaderMap::new, h::without_jetstream);
        let id = headers
            .get(h::CE_ID)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        headers.insert(h::NATS_MSG_ID, format!("replay:{id}:{run_ms}"));
        headers.insert(
            h::CHOREO_REPLAY,
            format!("{}.{} {} {seq}", plan.service, plan.handler, plan.stream),
        );
        let ack = js
            .publish_with_headers(
                format!("{prefix}.{}", m.subject),
                headers,
                m.payload.clone(),
            )
            .await
            .map_err(|e| fail(&e))?;
        acks.push(ack.into_future());
        copied += 1;
        if acks.len() >= IN_FLIGHT
            && let Some(a) = acks.next().await
        {
            a.map_err(|e| fail(&e))?;
        }
        if seq >= plan.until || pending == 0 {
            break;
        }
    }
    while let Some(a) = acks.next().await {
        a.map_err(|e| fail(&e))?;
    }
    Ok(copied)
}

/// Makes the handler's work-queue stream take copies on `prefix.>`,
/// partitioned by the transform it sources with.
async fn take_copies(js: &jetstream::Context, plan: &Plan, prefix: &str) -> Result<(), String> {
    let name = stream_name(&plan.service, &plan.handler);
    let mut s = js
        .get_stream(&name)
        .await
        .map_err(|e| format!("the partition stream {name}: {e}"))?;
    let mut config = s
        .info()
        .await
        .map_err(|e| format!("the partition stream {name}: {e}"))?
        .config
        .clone();
    let Some(t) = config
        .sources
        .iter()
        .flatten()
        .flat_map(|src| src.subject_transforms.iter())
        .next()
        .cloned()
    else {
        return Err(format!(
            "the partition stream {name} has no partitioning transform"
        ));
    };
    let want = stream::SubjectTransform {
        source: format!("{prefix}.{}", t.source),
        destination: t.destination,
    };
    let subjects = vec![format!("{prefix}.>")];
    if config.subject_transform.as_ref() == Some(&want) && config.subjects == subjects {
        return Ok(());
    }
    config.subjects = subjects;
    config.subject_transform = Some(want);
    js.update_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| format!("the partition stream {name} would not take copies: {e}"))
}
