//! [`Permissions`]: the least NATS permissions a service or a publisher
//! needs, built from the same names choreo uses to create and read them.

use std::collections::BTreeSet;

use super::{ADVISORY_STREAM, DLQ_STREAM, consumer_name, dlq_subject, inbox_bucket};
use crate::event::Event;
use crate::nats::JetStreamApi;

/// The subjects a NATS user must be allowed to publish to and subscribe
/// to, for a service ([`Service::permissions`](crate::Service::permissions))
/// or a publisher ([`Permissions::publishes`]). Render them with
/// [`to_config`](Self::to_config) into a nats-server `permissions` block.
///
/// ```
/// use choreo::{event, Permissions};
///
/// #[event(subject = "orders.{order_id}.placed")]
/// pub struct OrderPlaced { pub order_id: String }
///
/// let checkout = Permissions::default().publishes::<OrderPlaced>(&Default::default());
/// assert!(checkout.publish().contains(&"orders.*.placed".to_owned()));
/// assert!(checkout.publish().contains(&"$JS.API.STREAM.INFO.ORDERS".to_owned()));
/// assert_eq!(checkout.subscribe(), ["_INBOX.>"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    publish: BTreeSet<String>,
    subscribe: BTreeSet<String>,
    /// May answer requests (nats-server's `allow_responses`).
    responses: bool,
}

impl Permissions {
    /// Subjects to allow for publishing, sorted.
    pub fn publish(&self) -> Vec<String> {
        self.publish.iter().cloned().collect()
    }

    /// Subjects to allow for subscribing, sorted.
    pub fn subscribe(&self) -> Vec<String> {
        self.subscribe.iter().cloned().collect()
    }

    /// Adds what publishing events of type `E` through `api` needs: its
    /// subjects, looking its stream up (and creating it if missing), and
    /// reading a stored copy back when a duplicate has to be compared.
    #[must_use]
    pub fn publishes<E: Event>(self, api: &JetStreamApi) -> Self {
        self.publishes_type(&crate::event::EventType::of::<E>(), api)
    }

    /// What a publisher named `source` needs to record, once per event
    /// type, the root events it publishes in the registry; add each type
    /// with [`publishes`](Self::publishes).
    #[must_use]
    pub fn publisher(source: &str, api: &JetStreamApi) -> Self {
        let p = api.prefix();
        let mut me = Self::default();
        me.replies();
        let bucket = crate::topology::PUBLISHERS_BUCKET;
        // Creating a bucket reads the account's limits first.
        me.publish.insert(format!("{p}.INFO"));
        me.stream(&p, &format!("KV_{bucket}"));
        me.publish.insert(format!("$KV.{bucket}.{source}.>"));
        if *api != JetStreamApi::Local {
            me.publish.insert(format!("{p}.$KV.{bucket}.{source}.>"));
        }
        me
    }

    /// What an observer needs to read a running choreography through
    /// `api`: `choreo status`, `graph`, `lint` and `asyncapi`, or
    /// `choreo::admin`. It reads the registry's buckets, lists the
    /// consumers of every stream, counts dead letters, reads the oldest
    /// waiting event of a lagging handler (`STREAM.MSG.GET`), and counts
    /// inbox records with short-lived consumers of its own, which the
    /// server removes once idle. It may read every stream's events; it
    /// cannot publish an event, acknowledge one, or change or delete a
    /// stream, a durable consumer or a key.
    ///
    /// ```
    /// let viewer = choreo::Permissions::observer(&Default::default());
    /// assert!(viewer.publish().contains(&"$JS.API.CONSUMER.LIST.*".to_owned()));
    /// assert!(!viewer.publish().iter().any(|s| s.contains("DELETE") || s.starts_with("$JS.ACK")));
    /// ```
    #[must_use]
    pub fn observer(api: &JetStreamApi) -> Self {
        let p = api.prefix();
        let mut me = Self::default();
        me.replies();
        for s in [
            "STREAM.INFO.*",
            "STREAM.MSG.GET.*",
            "CONSUMER.LIST.*",
            "CONSUMER.CREATE.*",
        ] {
            me.publish.insert(format!("{p}.{s}"));
        }
        // Aggregates' states at a point (`choreo console`), which their
        // services answer.
        me.publish.insert("$CHOREO.STATE.*".to_owned());
        // The next deadline to fire (`choreo status`).
        me.publish
            .insert(format!("{p}.DIRECT.GET.{}", super::DEADLINE_STREAM));
        me.publish
            .insert(format!("{p}.DIRECT.GET.{}.>", super::DEADLINE_STREAM));
        for bucket in [
            crate::topology::REGISTRY_BUCKET,
            crate::topology::PUBLISHERS_BUCKET,
        ] {
            me.publish.insert(format!("{p}.DIRECT.GET.KV_{bucket}"));
            me.publish.insert(format!("{p}.DIRECT.GET.KV_{bucket}.>"));
            // Listing a bucket's keys: its ordered consumer's flow control.
            me.publish.insert(format!("$JS.FC.KV_{bucket}.>"));
        }
        me
    }

    /// What a service needs to answer aggregate state requests (see
    /// `Service::aggregate`): subscribe to its state subject, and read the
    /// aggregates' streams with direct gets.
    #[must_use]
    pub fn answers_state<'a>(
        service: &str,
        api: &JetStreamApi,
        streams: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let p = api.prefix();
        let mut me = Self::default();
        me.replies();
        me.subscribe.insert(format!("$CHOREO.STATE.{service}"));
        me.responses = true;
        for s in streams {
            me.publish.insert(format!("{p}.DIRECT.GET.{s}"));
            me.publish.insert(format!("{p}.DIRECT.GET.{s}.>"));
            me.publish.insert(format!("{p}.STREAM.INFO.{s}"));
        }
        me
    }

    /// As [`publishes`](Self::publishes), for an event type described as data.
    #[must_use]
    pub fn publishes_type(mut self, event: &crate::event::EventType, api: &JetStreamApi) -> Self {
        let p = api.prefix();
        self.replies();
        self.publish.insert(event.subject_filter.to_owned());
        self.stream(&p, event.stream);
        self.publish
            .insert(format!("{p}.STREAM.MSG.GET.{}", event.stream));
        self
    }

    /// Adds another set.
    #[must_use]
    pub fn and(mut self, other: Permissions) -> Self {
        self.publish.extend(other.publish);
        self.subscribe.extend(other.subscribe);
        self.responses |= other.responses;
        self
    }

    /// Whether the user must be allowed to answer requests
    /// (`allow_responses`: a service that answers aggregate state requests).
    pub fn responds(&self) -> bool {
        self.responses
    }

    /// A nats-server `permissions` value: `{ publish: { allow: [...] },
    /// subscribe: { allow: [...] } }`, with `allow_responses: true` when
    /// it [responds](Self::responds).
    pub fn to_config(&self) -> String {
        let list = |s: &BTreeSet<String>| {
            s.iter()
                .map(|x| format!("{x:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{} }}",
            list(&self.publish),
            list(&self.subscribe),
            if self.responses {
                ", allow_responses: true"
            } else {
                ""
            }
        )
    }

    fn replies(&mut self) {
        self.subscribe.insert("_INBOX.>".to_owned());
    }

    fn stream(&mut self, p: &str, stream: &str) {
        self.publish.insert(format!("{p}.STREAM.INFO.{stream}"));
        self.publish.insert(format!("{p}.STREAM.CREATE.{stream}"));
    }

    /// A consumer `durable` on `stream`: creating or updating it, reading
    /// its info, pulling, and acknowledging.
    fn consumer(&mut self, p: &str, stream: &str, durable: &str) {
        self.publish
            .insert(format!("{p}.CONSUMER.CREATE.{stream}.{durable}.>"));
        self.publish
            .insert(format!("{p}.CONSUMER.INFO.{stream}.{durable}"));
        self.publish
            .insert(format!("{p}.CONSUMER.MSG.NEXT.{stream}.{durable}"));
        self.publish.insert(format!("$JS.ACK.{stream}.{durable}.>"));
    }

    /// What service `service` needs for its infrastructure through `api`,
    /// and per handler `(name, stream, idempotent, partitions)` (0
    /// partitions: not ordered).
    pub(crate) fn service(
        service: &str,
        api: &JetStreamApi,
        handlers: impl IntoIterator<Item = (&'static str, &'static str, bool, u16)>,
    ) -> Self {
        let p = api.prefix();
        let mut me = Self::default();
        me.replies();
        me.publish.insert(format!("{p}.INFO"));
        me.stream(&p, DLQ_STREAM);
        me.stream(&p, ADVISORY_STREAM);
        let mut inbox = false;
        for (handler, stream, idempotent, partitions) in handlers {
            let durable = consumer_name(service, handler);
            me.stream(&p, stream);
            if partitions == 0 {
                me.consumer(&p, stream, &durable);
                me.consumer(&p, ADVISORY_STREAM, &format!("{durable}--lost"));
                // The event a lost delivery names, read back to dead-letter it.
                me.publish.insert(format!("{p}.STREAM.MSG.GET.{stream}"));
            } else {
                // Its partition stream (sourcing from `stream`) and durables.
                let queue = super::ordered::stream_name(service, handler);
                me.stream(&p, &queue);
                me.publish.insert(format!("{p}.STREAM.MSG.GET.{queue}"));
                for part in 0..partitions {
                    let d = super::ordered::partition_durable(service, handler, part);
                    me.consumer(&p, &queue, &d);
                    // Releasing its pin to another instance, and replacing
                    // a durable made by an older choreo.
                    me.publish.insert(format!("{p}.CONSUMER.UNPIN.{queue}.{d}"));
                    me.publish
                        .insert(format!("{p}.CONSUMER.DELETE.{queue}.{d}"));
                    me.consumer(&p, ADVISORY_STREAM, &format!("{d}--lost"));
                }
            }
            if stream == super::DEADLINE_STREAM {
                // A deadline handler's schedules, decisions and cancels.
                me.publish.insert(format!("choreo.deadline.{service}.>"));
                me.publish.insert(format!("{p}.STREAM.PURGE.{stream}"));
            }
            me.publish.insert(dlq_subject(service, handler));
            inbox |= idempotent;
        }
        // Its record in the registry.
        me.stream(&p, &format!("KV_{}", crate::topology::REGISTRY_BUCKET));
        me.publish.insert(format!(
            "$KV.{}.services.{service}.>",
            crate::topology::REGISTRY_BUCKET
        ));
        if *api != JetStreamApi::Local {
            me.publish.insert(format!(
                "{p}.$KV.{}.services.{service}.>",
                crate::topology::REGISTRY_BUCKET
            ));
        }
        if inbox {
            let bucket = inbox_bucket(service);
            me.stream(&p, &format!("KV_{bucket}"));
            // Once: recording the group count and allowing claims' TTLs.
            me.publish.insert(format!("{p}.STREAM.UPDATE.KV_{bucket}"));
            // A group read from the leader after a conflicting write.
            me.publish.insert(format!("{p}.STREAM.MSG.GET.KV_{bucket}"));
            me.publish.insert(format!("{p}.DIRECT.GET.KV_{bucket}"));
            me.publish.insert(format!("{p}.DIRECT.GET.KV_{bucket}.>"));
            me.publish.insert(format!("$KV.{bucket}.>"));
            if *api != JetStreamApi::Local {
                // async-nats writes keys through the API prefix then.
                me.publish.insert(format!("{p}.$KV.{bucket}.>"));
            }
        }
        me
    }
}
