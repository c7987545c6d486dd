//! What a service creates on the server before its handlers run: streams,
//! the inbox, each handler's durable (an ordered handler's partition
//! stream and one durable per partition) and lost-delivery consumer.

use async_nats::jetstream;

use super::checks::{say_backlog, say_behind};
use super::{Service, StartError};
use crate::inbox::Inbox;
use crate::runtime::Erased;
use crate::topology::consumer::{create_advisory_consumer, create_consumer, ensure_streams};
use crate::topology::consumer_name;
use crate::topology::stream::{check_jetstream, ensure_stream};

/// One durable a handler pulls from (an ordered handler has one per
/// partition), and its lost-delivery consumer.
pub(super) struct Durable {
    pub(super) consumer: jetstream::consumer::PullConsumer,
    pub(super) advisory: jetstream::consumer::PullConsumer,
    pub(super) partition: Option<crate::runtime::Partition>,
}

/// Per handler, its durables.
pub(super) type Consumers = Vec<Vec<Durable>>;

impl Service {
    /// Creates what the service needs on the server: streams, the inbox, and
    /// each handler's consumer and lost-delivery consumer.
    pub(super) async fn prepare(
        &self,
        js: &jetstream::Context,
    ) -> Result<(Option<Inbox>, Consumers), StartError> {
        check_jetstream(js).await?;
        ensure_streams(js, &self.stream_settings).await?;
        if self.deadlines {
            crate::deadline::ensure_stream(js, &self.stream_settings).await?;
        }
        let inbox = if self.handlers.iter().any(|h| h.options().idempotent) {
            Some(
                Inbox::open(
                    js,
                    &self.api.prefix(),
                    &self.name,
                    self.inbox_retention,
                    self.stream_settings.replicas,
                    self.inbox_groups,
                )
                .await?,
            )
        } else {
            None
        };
        let mut consumers = Vec::with_capacity(self.handlers.len());
        // Plain handlers' durables, to check against their stream's age.
        let mut behind = Vec::new();
        for h in &self.handlers {
            let (stream, subjects, filter) = h.stream();
            ensure_stream(
                js,
                &self.stream_settings,
                stream,
                vec![subjects.to_owned()],
                filter,
            )
            .await?;
            let durable = consumer_name(&self.name, h.name());
            if let (Some(ordered), Some(wildcards)) = (h.options().ordered, h.ordering_wildcards())
            {
                consumers.push(self.partitions(js, &**h, ordered, wildcards).await?);
                continue;
            }
            let consumer = create_consumer(
                js,
                stream,
                &durable,
                filter,
                &h.options().consumer_spec(),
                h.name(),
                None,
            )
            .await?;
            let advisory = create_advisory_consumer(js, stream, &durable, h.name()).await?;
            say_backlog(
                &self.name,
                h.name(),
                stream,
                &h.options(),
                consumer.cached_info(),
            );
            if stream != crate::deadline::STREAM {
                behind.push((h.name(), filter, consumer.cached_info().clone()));
            }
            consumers.push(vec![Durable {
                consumer,
                advisory,
                partition: None,
            }]);
        }
        let infos = self.stream_infos(js).await;
        for (handler, filter, consumer) in &behind {
            if let Some(info) = infos.iter().find(|i| i.config.name == consumer.stream_name) {
                say_behind(js, &self.name, handler, (info, filter), consumer).await;
            }
        }
        self.say_footprint(&infos);
        Ok((inbox, consumers))
    }

    /// The streams the service's handlers read, each read once (one that
    /// cannot be read is left out: the checks it serves say nothing). The
    /// deadline stream is not among them: its records expire on their own
    /// (see `crate::deadline`), so it never grows without bound.
    async fn stream_infos(&self, js: &jetstream::Context) -> Vec<jetstream::stream::Info> {
        let mut infos: Vec<jetstream::stream::Info> = Vec::new();
        for h in &self.handlers {
            let (stream, _, _) = h.stream();
            if stream == crate::deadline::STREAM || infos.iter().any(|i| i.config.name == stream) {
                continue;
            }
            if let Ok(s) = js.get_stream(stream).await {
                infos.push(s.cached_info().clone());
            }
        }
        infos
    }

    /// Warns at start when what the service's streams (`infos`) and inbox
    /// will hold projects past its budget (see [`super::footprint`]).
    fn say_footprint(&self, infos: &[jetstream::stream::Info]) {
        use super::footprint;
        let handlers: Vec<(&str, Option<f64>)> = self
            .handlers
            .iter()
            .filter(|h| h.options().idempotent)
            .map(|h| {
                let (stream, _, _) = h.stream();
                let rate = infos
                    .iter()
                    .find(|i| i.config.name == stream)
                    .and_then(footprint::stream_rate);
                (h.name(), rate)
            })
            .collect();
        // A deadline's A events are on the stream its schedule step reads.
        let deadlines: Vec<footprint::DeadlineLoad<'_>> = self
            .handlers
            .iter()
            .filter_map(|h| {
                let d = h.deadline()?;
                let schedule = self.handlers.iter().find(|s| s.name() == d.schedule)?;
                let (stream, _, _) = schedule.stream();
                let rate = infos
                    .iter()
                    .find(|i| i.config.name == stream)
                    .and_then(footprint::stream_rate);
                Some((h.name(), rate, d.within, self.deadline_retention))
            })
            .collect();
        let found = footprint::findings(
            infos,
            &handlers,
            &deadlines,
            self.inbox_groups,
            self.inbox_retention,
            self.server_budget,
        );
        footprint::warn(&self.name, &found, self.server_budget);
    }

    /// An ordered handler's partition stream and its partitions' durables.
    async fn partitions(
        &self,
        js: &jetstream::Context,
        h: &dyn Erased,
        ordered: crate::handler::Ordered,
        wildcards: Vec<usize>,
    ) -> Result<Vec<Durable>, StartError> {
        use crate::topology::ordered;
        let (stream, _, filter) = h.stream();
        let spec = h.options().consumer_spec();
        let p = ordered::Partitioning {
            service: &self.name,
            handler: h.name(),
            origin: stream,
            filter,
            wildcards: wildcards.clone(),
            partitions: ordered.partitions,
        };
        ordered::ensure_stream(js, &self.stream_settings, &p, spec.deliver).await?;
        let on = ordered::stream_name(&self.name, h.name());
        let mut out = Vec::with_capacity(usize::from(ordered.partitions));
        for part in 0..ordered.partitions {
            let consumer = ordered::create_partition_consumer(js, &p, part, &spec).await?;
            let advisory =
                create_advisory_consumer(js, &on, &consumer.cached_info().name, h.name()).await?;
            out.push(Durable {
                consumer,
                advisory,
                partition: Some(crate::runtime::Partition {
                    part,
                    partitions: ordered.partitions,
                    wildcards: wildcards.clone(),
                    key_tokens: key_tokens(filter, &wildcards),
                }),
            });
        }
        Ok(out)
    }
}

/// The 0-based token positions, in a subject matching `filter`, of its
/// `*` tokens numbered `wildcards` (1-based, in filter order).
fn key_tokens(filter: &str, wildcards: &[usize]) -> Vec<usize> {
    let stars: Vec<usize> = filter
        .split('.')
        .enumerate()
        .filter(|(_, t)| *t == "*")
        .map(|(i, _)| i)
        .collect();
    wildcards
        .iter()
        .filter_map(|w| stars.get(w.checked_sub(1)?).copied())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_tokens_are_the_ordering_wildcards_positions() {
        assert_eq!(super::key_tokens("ledger.*.stepped", &[1]), vec![1]);
        assert_eq!(super::key_tokens("t.*.x.*.y", &[2]), vec![3]);
        assert_eq!(super::key_tokens("t.*.x.*.y", &[2, 1]), vec![3, 1]);
    }
}
