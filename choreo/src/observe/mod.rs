//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: choreo
//! records, the application installs the exporter it likes (Prometheus,
//! OpenTelemetry, statsd). Install the recorder before starting services
//! and publishers: handles are taken once, when each starts.
//!
//! Names follow OpenTelemetry's messaging conventions where one exists, and
//! are `choreo.*` otherwise. Every metric carries `messaging.system = nats`;
//! a handler's also `choreo.service`, `choreo.handler`,
//! `messaging.consumer.group.name` (its durable) and
//! `messaging.destination.name` (its stream).
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `messaging.client.consumed.messages` | counter | deliveries a handler received |
//! | `choreo.handler.outcomes` | counter, label `choreo.outcome` | `handled`, `skipped` (a duplicate the inbox knew), `retried`, `dead_lettered`, `timed_out` |
//! | `messaging.process.duration` | histogram, seconds | one delivery, from receipt to its verdict |
//! | `choreo.event.age` | histogram, seconds | now minus the event's `ce-time`, when handled |
//! | `choreo.consumer.lag` | gauge, messages | the delivery's pending count: what waits behind it |
//! | `choreo.consumer.lag.age` | gauge, seconds | how long the oldest event the handler has not finished has been stored (0 when none waits), read with its consumer every 1–5 s; for a deadline's watchers (`<handler>__met_<B>`), how late a deadline due now is decided |
//! | `messaging.client.operation.duration` | histogram, seconds, `messaging.operation.name = publish` | one publish, to its PubAck |
//! | `messaging.client.sent.messages` | counter | events stored (duplicates included) |
//! | `choreo.publish.failures` | counter | publishes that failed |
//! | `choreo.inbox.reads` | counter, label `choreo.read = key \| batch` | inbox look-ups |
//! | `choreo.inbox.writes` | counter, label `choreo.write = record \| claim` | inbox writes |
//!
//! Prometheus exporters write the dots as underscores
//! (`choreo_handler_outcomes{choreo_outcome="handled"}`). The shop serves
//! them with `--metrics 127.0.0.1:9464`, and
//! `examples/tests/shop.rs::the_shop_serves_prometheus_metrics_that_match_what_it_did`
//! checks the counters against what the shop did.

use metrics::{Counter, Gauge, Histogram, Label};

/// `messaging.client.consumed.messages`.
pub const CONSUMED: &str = "messaging.client.consumed.messages";
/// `choreo.handler.outcomes`.
pub const OUTCOMES: &str = "choreo.handler.outcomes";
/// `messaging.process.duration`.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// `choreo.event.age`.
pub const EVENT_AGE: &str = "choreo.event.age";
/// `choreo.consumer.lag`.
pub const LAG: &str = "choreo.consumer.lag";
/// `choreo.consumer.lag.age`.
pub const LAG_AGE: &str = "choreo.consumer.lag.age";
/// `messaging.client.operation.duration`.
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// `messaging.client.sent.messages`.
pub const SENT: &str = "messaging.client.sent.messages";
/// `choreo.publish.failures`.
pub const PUBLISH_FAILURES: &str = "choreo.publish.failures";
/// `choreo.inbox.reads`.
pub const INBOX_READS: &str = "choreo.inbox.reads";
/// `choreo.inbox.writes`.
pub const INBOX_WRITES: &str = "choreo.inbox.writes";

fn system() -> Label {
    Label::new("messaging.system", "nats")
}

/// One handler's handles, taken when it starts.
#[derive(Clone)]
pub(crate) struct HandlerMetrics {
    pub(crate) consumed: Counter,
    pub(crate) handled: Counter,
    pub(crate) skipped: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) timed_out: Counter,
    pub(crate) duration: Histogram,
    pub(crate) age: Histogram,
    pub(crate) lag: Gauge,
    pub(crate) lag_age: Gauge,
}

impl HandlerMetrics {
    pub(crate) fn new(service: &str, handler: &str, durable: &str, stream: &str) -> Self {
        let labels = vec![
            system(),
            Label::new("choreo.service", service.to_owned()),
            Label::new("choreo.handler", handler.to_owned()),
            Label::new("messaging.consumer.group.name", durable.to_owned()),
            Label::new("messaging.destination.name", stream.to_owned()),
        ];
        let outcome = |o: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new("choreo.outcome", o));
            metrics::counter!(OUTCOMES, l)
        };
        Self {
            consumed: metrics::counter!(CONSUMED, labels.clone()),
            handled: outcome("handled"),
            skipped: outcome("skipped"),
            retried: outcome("retried"),
            dead_lettered: outcome("dead_lettered"),
            timed_out: outcome("timed_out"),
            duration: metrics::histogram!(PROCESS_DURATION, labels.clone()),
            age: metrics::histogram!(EVENT_AGE, labels.clone()),
            lag: metrics::gauge!(LAG, labels.clone()),
            lag_age: metrics::gauge!(LAG_AGE, labels),
        }
    }
}

/// A publisher's handles for one stream.
#[derive(Clone)]
pub(crate) struct PublishMetrics {
    pub(crate) duration: Histogram,
    pub(crate) sent: Counter,
    pub(crate) failures: Counter,
}

impl PublishMetrics {
    pub(crate) fn new(source: &str, stream: &'static str) -> Self {
        let labels = vec![
            system(),
            Label::new("choreo.source", source.to_owned()),
            Label::new("messaging.destination.name", stream),
        ];
        let mut timed = labels.clone();
        timed.push(Label::new("messaging.operation.name", "publish"));
        Self {
            duration: metrics::histogram!(OPERATION_DURATION, timed),
            sent: metrics::counter!(SENT, labels.clone()),
            failures: metrics::counter!(PUBLISH_FAILURES, labels),
        }
    }
}

/// An inbox's handles.
#[derive(Clone)]
pub(crate) struct InboxMetrics {
    pub(crate) key_reads: Counter,
    pub(crate) batch_reads: Counter,
    pub(crate) records: Counter,
    pub(crate) claims: Counter,
}

impl InboxMetrics {
    pub(crate) fn new(service: &str) -> Self {
        let labels = vec![system(), Label::new("choreo.service", service.to_owned())];
        let with = |k: &'static str, v: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new(k, v));
            l
        };
        Self {
            key_reads: metrics::counter!(INBOX_READS, with("choreo.read", "key")),
            batch_reads: metrics::counter!(INBOX_READS, with("choreo.read", "batch")),
            records: metrics::counter!(INBOX_WRITES, with("choreo.write", "record")),
            claims: metrics::counter!(INBOX_WRITES, with("choreo.write", "claim")),
        }
    }
}

impl std::fmt::Debug for PublishMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishMetrics")
    }
}

impl std::fmt::Debug for InboxMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboxMetrics")
    }
}
