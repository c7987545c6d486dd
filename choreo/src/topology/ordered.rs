//! An ordered handler's partitions: a work-queue stream that sources the
//! handler's events from their stream, putting a partition number in front
//! of each subject (the server's `{{partition(n, ..)}}` subject transform,
//! a hash of the ordering fields' tokens), and one durable consumer per
//! partition with a pinned priority group (nats-server 2.11): the server
//! delivers a partition's events, in stream order and up to [`WINDOW`]
//! unacknowledged at a time, to one pinned instance, which runs the events
//! of one key one at a time (`runtime::ordered`). Every instance asks; the
//! pin moves when the holder stops asking for the consumer's
//! `priority_timeout` (its `ack_wait`) or releases it.
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
    check_version(&js.client().server_info().version, &name)?;
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

/// The priority group every instance pulls a partition with.
pub(crate) const GROUP: &str = "choreo";

/// How many events of one partition of an ordered handler may be out
/// unacknowledged: the server's `max_ack_pending` on each partition's
/// durable, and so the most one partition runs (events of different keys)
/// and holds at once on the instance it is pinned to.
pub const WINDOW: usize = 64;

/// The server version that has pinned priority groups.
pub(crate) const NEEDS: (u64, u64) = (2, 11);

/// Refuses a server without pinned priority groups, saying what to do.
pub(crate) fn check_version(version: &str, stream: &str) -> Result<(), StreamError> {
    if crate::nats::version_at_least(version, NEEDS) {
        return Ok(());
    }
    Err(StreamError::Other {
        stream: stream.to_owned(),
        source: crate::nats::message(format!(
            "ordered handlers need pinned priority groups, which nats-server {}.{} added; this server is {version}. \
             Upgrade the server, or drop `ordered_by` from the service's handlers",
            NEEDS.0, NEEDS.1
        )),
    })
}

/// The durable of partition `part`: up to [`WINDOW`] events out at a time,
/// to the one instance the server pins in [`GROUP`]. A durable made by an
/// older choreo (one event at a time, no group) is replaced: the server
/// does not change a consumer's priority policy in place, and a work queue
/// keeps the events its durable had not acknowledged, so the new one
/// delivers them again (the inbox skips those already handled).
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
        max_ack_pending: i64::try_from(WINDOW).unwrap_or(i64::MAX),
        priority_policy: jetstream::consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![GROUP.to_owned()],
        priority_timeout: o.ack_wait,
        ..Default::default()
    };
    let s = js
        .get_stream(&name)
        .await
        .map_err(|e| ConsumerError::new(&client, p.handler, &name, &durable, e))?;
    if let Ok(old) = s.consumer_info(&durable).await
        && old.config.priority_policy != jetstream::consumer::PriorityPolicy::PinnedClient
    {
        tracing::info!(consumer = %durable, "replacing a partition durable of an older choreo (one event at a time) with a pinned one");
        let _ = s.delete_consumer(&durable).await;
    }
    s.create_consumer(config)
        .await
        .map_err(|e| ConsumerError::new(&client, p.handler, &name, &durable, e))
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn ordered_handlers_need_a_server_with_pinned_groups() {
        assert!(super::check_version("2.11.0", "Q").is_ok());
        assert!(super::check_version("2.15.1", "Q").is_ok());
        let e = super::check_version("2.10.22", "Q")
            .unwrap_err()
            .to_string();
        assert!(e.contains("2.11") && e.contains("2.10.22"), "{e}");
    }
}
