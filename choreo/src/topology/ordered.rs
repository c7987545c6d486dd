//! An ordered handler's partitions: a work-queue stream that sources the
//! handler's events from their stream, putting a partition number in front
//! of each subject (the server's `{{partition(n, ..)}}` subject transform,
//! a hash of the ordering fields' tokens), and one durable consumer per
//! partition, which delivers one event at a time (`max_ack_pending` 1):
//! the next event of a partition goes out only once the one before it is
//! acknowledged or dead-lettered, to whichever instance asks first. Every
//! instance pulls from every partition, so the partitions' events spread
//! over the instances while each partition runs in order on one of them at
//! a time; an instance that dies holds its one event for `ack_wait`, then
//! the server gives it to another.
//!
//! The events' stream, their subjects and their bytes are untouched: other
//! readers see nothing of it. Acknowledged events leave the work queue, so
//! it holds only what the handler has not done yet.

use async_nats::jetstream::{self, consumer::pull, stream};

use super::{ConsumerError, StreamError, StreamSettings, consumer::ConsumerSpec};

/// The work-queue stream of an ordered handler.
pub(crate) fn stream_name(service: &str, handler: &str) -> String {
    format!("CHOREO_ORDERED_{service}_{handler}")
}

/// The subject prefix of its partition `p`, without the trailing dot.
pub(crate) fn partition_prefix(service: &str, handler: &str, p: u16) -> String {
    format!("choreo.ordered.{service}.{handler}.{p}")
}

/// How many tokens the partition prefix adds in front of an event's subject.
pub(crate) const PREFIX_TOKENS: usize = 5;

/// The durable of partition `p`: `<service>--<handler>--p<p>`.
pub(crate) fn partition_durable(service: &str, handler: &str, p: u16) -> String {
    format!("{}--p{p}", super::consumer_name(service, handler))
}

/// The transform's destination for events on `filter` (`orders.*.placed`),
/// hashing the `*` tokens at `wildcards` (1-based) into `partitions`.
pub(crate) fn destination(
    service: &str,
    handler: &str,
    filter: &str,
    wildcards: &[usize],
    partitions: u16,
) -> String {
    let mut n = 0;
    let rest: Vec<String> = filter
        .split('.')
        .map(|t| {
            if t == "*" {
                n += 1;
                format!("{{{{wildcard({n})}}}}")
            } else {
                t.to_owned()
            }
        })
        .collect();
    let by: Vec<String> = wildcards.iter().map(usize::to_string).collect();
    format!(
        "choreo.ordered.{service}.{handler}.{{{{partition({partitions},{})}}}}.{}",
        by.join(","),
        rest.join(".")
    )
}

/// What the partitions are made from.
pub(crate) struct Partitioning<'a> {
    pub(crate) service: &'a str,
    pub(crate) handler: &'a str,
    /// The events' stream and the handler's filter on it.
    pub(crate) origin: &'a str,
    pub(crate) filter: &'a str,
    /// The 1-based `*` positions of the ordering fields in `filter`.
    pub(crate) wildcards: Vec<usize>,
    pub(crate) partitions: u16,
}

/// Creates the work-queue stream if missing. A new one starts sourcing
/// where the handler's `deliver` policy says; an existing one keeps its
/// position (and its partition count: changing it needs a new stream, as
/// the error says).
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    p: &Partitioning<'_>,
    deliver: jetstream::consumer::DeliverPolicy,
) -> Result<(), StreamError> {
    let name = stream_name(p.service, p.handler);
    let dest = destination(p.service, p.handler, p.filter, &p.wildcards, p.partitions);
    if let Ok(mut s) = js.get_stream(&name).await {
        let info = s
            .info()
            .await
            .map_err(|e| StreamError::from_nats(&js.client(), &name, e))?;
        let same = info
            .config
            .sources
            .iter()
            .flatten()
            .any(|src| src.subject_transforms.iter().any(|t| t.destination == dest));
        if !same {
            return Err(StreamError::Other {
                stream: name.clone(),
                source: crate::nats::message(format!(
                    "the ordered handler's partition stream {name} was made for another partitioning; \
                     delete it (`nats stream rm {name}`) to repartition into {} partitions: the events it \
                     holds are sourced again from {} and the inbox skips what was already handled",
                    p.partitions, p.origin
                )),
            });
        }
        return Ok(());
    }
    let (start_sequence, start_time) = match deliver {
        jetstream::consumer::DeliverPolicy::New => {
            let last = js
                .get_stream(p.origin)
                .await
                .map_err(|e| StreamError::from_nats(&js.client(), p.origin, e))?
                .cached_info()
                .state
                .last_sequence;
            (Some(last + 1), None)
        }
        jetstream::consumer::DeliverPolicy::ByStartTime { start_time } => (None, Some(start_time)),
        _ => (None, None),
    };
    let config = stream::Config {
        name: name.clone(),
        description: Some(format!(
            "choreo: the events of ordered handler {}--{}, by partition, until handled",
            p.service, p.handler
        )),
        retention: stream::RetentionPolicy::WorkQueue,
        num_replicas: settings.replicas,
        sources: Some(vec![stream::Source {
            name: p.origin.to_owned(),
            start_sequence,
            start_time,
            subject_transforms: vec![stream::SubjectTransform {
                source: p.filter.to_owned(),
                destination: dest,
            }],
            ..Default::default()
        }]),
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(_) => Ok(()),
        // Another instance made it in between.
        Err(_) if js.get_stream(&name).await.is_ok() => Ok(()),
        Err(e) => Err(StreamError::from_create(&js.client(), &name, &[], e)),
    }
}

/// The durable of partition `part`: one event at a time, across every
/// instance.
pub(crate) async fn create_partition_consumer(
    js: &jetstream::Context,
    p: &Partitioning<'_>,
    part: u16,
    o: &ConsumerSpec,
) -> Result<jetstream::consumer::PullConsumer, ConsumerError> {
    let name = stream_name(p.service, p.handler);
    let durable = partition_durable(p.service, p.handler, part);
    let client = js.client();
    let config = pull::Config {
        durable_name: Some(durable.clone()),
        description: Some(format!(
            "choreo ordered handler {}--{}, partition {part}",
            p.service, p.handler
        )),
        filter_subject: format!("{}.>", partition_prefix(p.service, p.handler, part)),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: o.ack_wait,
        max_deliver: i64::from(o.max_deliver),
        max_ack_pending: 1,
        ..Default::default()
    };
    let s = js
        .get_stream(&name)
        .await
        .map_err(|e| ConsumerError::new(&client, p.handler, &name, &durable, e))?;
    s.create_consumer(config)
        .await
        .map_err(|e| ConsumerError::new(&client, p.handler, &name, &durable, e))
}
