//! The reads one [`Snapshot`](super::Snapshot) is made of: each stream's
//! consumer list, an ordered handler's partitions merged into one reading,
//! the oldest waiting event, inbox record counts and dead-letter counts.
//! Each gives up at once on a permission violation.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;

use crate::nats::Source;
use crate::registry;
use crate::topology::{DLQ_STREAM, DLQ_SUBJECTS, inbox_bucket};

/// One handler's durable consumer as read at one moment.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Reading {
    pub(super) service: String,
    pub(super) handler: String,
    pub(super) durable: String,
    pub(super) stream: String,
    pub(super) pending: u64,
    pub(super) unacked: u64,
    pub(super) redelivered: u64,
    pub(super) ack_floor: u64,
    /// When the consumer last had an event acked (or was created), Unix ms.
    pub(super) last_ack_ms: u64,
    /// The server's time of the oldest event not yet done, Unix ms.
    pub(super) oldest_waiting_ms: Option<u64>,
    /// An ordered handler's partitions, read as one: its stream is a work
    /// queue, whose first message is the oldest not yet done.
    pub(super) work_queue: bool,
    pub(super) inbox_keys: Option<u64>,
    /// A deadline handler's pending deadlines.
    pub(super) deadlines: Option<super::deadlines::Pending>,
    /// Its stream's `max_age`, ms; 0 when it keeps every event (or its
    /// stream could not be read).
    pub(super) max_age_ms: u64,
}

/// `read`, or at once the permission violation it caused.
pub(super) async fn guarded<T>(
    js: &jetstream::Context,
    read: impl std::future::Future<Output = Result<T, Source>>,
) -> Result<T, Source> {
    crate::nats::or_denied(&js.client(), read)
        .await
        .unwrap_or_else(|v| Err(crate::nats::message(format!("the server denied it ({v})"))))
}

/// A stream's `max_age` (zero: it keeps every event) and its consumers.
pub(super) async fn consumers_of(
    js: &jetstream::Context,
    stream: &str,
) -> Result<(Duration, Vec<consumer::Info>), Source> {
    guarded(js, async {
        let s = js.get_stream(stream).await.map_err(crate::nats::source)?;
        let max_age = s.cached_info().config.max_age;
        let list = s
            .consumers()
            .try_collect()
            .await
            .map_err(crate::nats::source)?;
        Ok((max_age, list))
    })
    .await
}

/// An ordered handler's partition durables (`<durable>--p<n>`) as one
/// reading under its durable: their counts summed, its ack floor the sum
/// of theirs (it advances when any does).
pub(super) fn merge_partitions(
    manifests: &BTreeMap<String, &registry::Manifest>,
    readings: &mut BTreeMap<String, Reading>,
) {
    for m in manifests.values() {
        for h in m.handlers.iter().filter(|h| h.options.partitions > 0) {
            let prefix = format!("{}--p", h.durable);
            let parts: Vec<String> = readings
                .keys()
                .filter(|k| {
                    k.strip_prefix(&prefix)
                        .is_some_and(|n| n.parse::<u16>().is_ok())
                })
                .cloned()
                .collect();
            let parts: Vec<Reading> = parts.iter().filter_map(|k| readings.remove(k)).collect();
            let Some(first) = parts.first() else { continue };
            let mut merged = Reading {
                service: m.service.clone(),
                handler: h.name.clone(),
                durable: h.durable.clone(),
                stream: first.stream.clone(),
                pending: 0,
                unacked: 0,
                redelivered: 0,
                ack_floor: 0,
                last_ack_ms: 0,
                oldest_waiting_ms: None,
                work_queue: true,
                inbox_keys: None,
                deadlines: None,
                max_age_ms: 0,
            };
            for p in &parts {
                merged.pending += p.pending;
                merged.unacked += p.unacked;
                merged.redelivered += p.redelivered;
                merged.ack_floor += p.ack_floor;
                merged.last_ack_ms = merged.last_ack_ms.max(p.last_ack_ms);
            }
            readings.insert(merged.durable.clone(), merged);
        }
    }
}

/// A choreo durable (`<service>--<handler>`) as a reading.
pub(super) fn reading(info: &consumer::Info) -> Option<Reading> {
    let durable = info.config.durable_name.clone()?;
    let (service, handler) = durable.split_once("--")?;
    let ms =
        |t: time::OffsetDateTime| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    Some(Reading {
        service: service.to_owned(),
        handler: handler.to_owned(),
        stream: info.stream_name.clone(),
        pending: info.num_pending,
        unacked: info.num_ack_pending as u64,
        redelivered: info.num_redelivered as u64,
        ack_floor: info.ack_floor.stream_sequence,
        last_ack_ms: ms(info.ack_floor.last_active.unwrap_or(info.created)),
        oldest_waiting_ms: None,
        work_queue: false,
        inbox_keys: None,
        deadlines: None,
        max_age_ms: 0,
        durable,
    })
}

/// The server's time of the first event past the ack floor on the
/// handler's subjects.
pub(super) async fn oldest_waiting(
    js: &jetstream::Context,
    r: &Reading,
    filter: &str,
) -> Option<u64> {
    let s = js.get_stream_no_info(&r.stream).await.ok()?;
    let (from, filter) = if r.work_queue {
        (1, ">")
    } else {
        (r.ack_floor + 1, filter)
    };
    let m = s
        .raw_message_builder()
        .sequence(from)
        .next_by_subject(filter)
        .send()
        .await
        .ok()?;
    u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).ok()
}

/// How many keys (record groups and claims) the handler has in its
/// service's inbox bucket: an
/// ephemeral consumer on its keys, last per subject, counts them without
/// reading one (the server works them out from its subject index).
pub(super) async fn inbox_keys(
    js: &jetstream::Context,
    service: &str,
    handler: &str,
) -> Option<u64> {
    let bucket = inbox_bucket(service);
    let s = js.get_stream_no_info(format!("KV_{bucket}")).await.ok()?;
    let c = s
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("$KV.{bucket}.{handler}.>"),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            // Never deleted by hand (an observer may not delete
            // consumers): the server drops it once idle this long.
            inactive_threshold: Duration::from_secs(2),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(c.cached_info().num_pending)
}

/// Letters per `choreo.dlq.<service>.<handler>` subject.
pub(super) async fn dead_letters(js: &jetstream::Context) -> Result<BTreeMap<String, u64>, Source> {
    let s: stream::Stream<stream::Info> = match js.get_stream(DLQ_STREAM).await {
        Ok(s) => s,
        // No dead letter was ever written.
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(BTreeMap::new());
        }
        Err(e) => return Err(crate::nats::source(e)),
    };
    let subjects = s
        .info_with_subjects(DLQ_SUBJECTS)
        .await
        .map_err(crate::nats::source)?;
    let counts: Vec<(String, usize)> = subjects.try_collect().await.map_err(crate::nats::source)?;
    Ok(counts.into_iter().map(|(k, v)| (k, v as u64)).collect())
}
