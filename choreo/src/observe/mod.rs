//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: choreo
//! records, the application installs the exporter it likes (Prometheus,
//! OpenTelemetry, statsd). Install the recorder before starting services
//! and publishers: handles are taken once, when each starts, and each
//! metric is described then (help text and unit).
//!
//! Names are the Prometheus names of OpenTelemetry's messaging conventions
//! where one exists (what OpenTelemetry's own Prometheus conversion gives:
//! a counter ends in `.total`, a duration in `.seconds`), and `choreo.*`
//! otherwise. Every metric carries `messaging.system = nats`; a handler's
//! also `choreo.service`, `choreo.handler`, `messaging.consumer.group.name`
//! (its durable) and `messaging.destination.name` (its stream).
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `messaging.client.consumed.messages.total` | counter | deliveries a handler received |
//! | `choreo.handler.outcomes.total` | counter, label `choreo.outcome` | `handled`, `skipped` (a duplicate the inbox knew), `retried`, `dead_lettered`, `timed_out` |
//! | `messaging.process.duration.seconds` | histogram | one delivery, from receipt to its verdict |
//! | `choreo.event.age.seconds` | histogram | now minus the event's `ce-time`, when handled |
//! | `choreo.consumer.lag` | gauge, messages | the delivery's pending count: what waits behind it |
//! | `choreo.consumer.lag.seconds` | gauge | how long the oldest event the handler has not finished has been stored (0 when none waits), read with its consumer every 1–5 s; for a deadline's watchers (`<handler>__met_<B>`), how late a deadline due now is decided |
//! | `messaging.client.operation.duration.seconds` | histogram, `messaging.operation.name = publish` | one publish, to its PubAck |
//! | `messaging.client.sent.messages.total` | counter | events stored (duplicates included) |
//! | `choreo.publish.failures.total` | counter | publishes that failed |
//! | `choreo.inbox.reads.total` | counter, label `choreo.read = key \| batch` | inbox look-ups |
//! | `choreo.inbox.writes.total` | counter, label `choreo.write = record \| claim` | inbox writes |
//!
//! Prometheus exporters write the dots as underscores
//! (`choreo_handler_outcomes_total{choreo_outcome="handled"}`). The names
//! carry their units already: leave an exporter's unit suffixes off (the
//! default of `metrics-exporter-prometheus`). Histograms are histograms in
//! Prometheus only when the exporter is given buckets; give it
//! [`SECONDS_BUCKETS`] (quantiles of a summary cannot be summed across
//! instances, a histogram's buckets can):
//!
//! ```ignore
//! metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .set_buckets(choreo::observe::SECONDS_BUCKETS)?
//!     .with_http_listener(addr)
//!     .install()?;
//! ```
//!
//! The shop serves them so with `--metrics 127.0.0.1:9464`;
//! `examples/tests/shop.rs::the_shop_serves_prometheus_metrics_that_match_what_it_did`
//! checks the counters against what the shop did and runs `promtool check
//! metrics` on the scrape.

use metrics::{Counter, Gauge, Histogram, Label};

/// `messaging.client.consumed.messages.total`.
pub const CONSUMED: &str = "messaging.client.consumed.messages.total";
/// `choreo.handler.outcomes.total`.
pub const OUTCOMES: &str = "choreo.handler.outcomes.total";
/// `messaging.process.duration.seconds`.
pub const PROCESS_DURATION: &str = "messaging.process.duration.seconds";
/// `choreo.event.age.seconds`.
pub const EVENT_AGE: &str = "choreo.event.age.seconds";
/// `choreo.consumer.lag`.
pub const LAG: &str = "choreo.consumer.lag";
/// `choreo.consumer.lag.seconds`.
pub const LAG_SECONDS: &str = "choreo.consumer.lag.seconds";
/// `messaging.client.operation.duration.seconds`.
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration.seconds";
/// `messaging.client.sent.messages.total`.
pub const SENT: &str = "messaging.client.sent.messages.total";
/// `choreo.publish.failures.total`.
pub const PUBLISH_FAILURES: &str = "choreo.publish.failures.total";
/// `choreo.inbox.reads.total`.
pub const INBOX_READS: &str = "choreo.inbox.reads.total";
/// `choreo.inbox.writes.total`.
pub const INBOX_WRITES: &str = "choreo.inbox.writes.total";

/// Bucket bounds, in seconds, for choreo's histograms (all in seconds): from
/// 1 ms, for a publish or a fast handler, to an hour, for the age of an
/// event a handler gets to late. Give them to the exporter (see above).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Describes every metric to the installed recorder: its help text and
/// unit. Called whenever a handler or publisher takes its handles (a
/// recorder keeps the first description).
fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(
        CONSUMED,
        Unit::Count,
        "Deliveries a choreo handler received."
    );
    metrics::describe_counter!(
        OUTCOMES,
        Unit::Count,
        "Deliveries a choreo handler finished, by outcome: handled, skipped (a duplicate its inbox knew), retried, dead_lettered, timed_out."
    );
    metrics::describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Seconds from a delivery's receipt to its verdict (ack, nak or dead letter)."
    );
    metrics::describe_histogram!(
        EVENT_AGE,
        Unit::Seconds,
        "Seconds from an event's ce-time to when a handler handled it."
    );
    metrics::describe_gauge!(
        LAG,
        Unit::Count,
        "Events waiting behind a handler's newest delivery (its pending count)."
    );
    metrics::describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Seconds since the oldest event a handler has not finished was stored (0 when none waits)."
    );
    metrics::describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Seconds from a publish to its PubAck."
    );
    metrics::describe_counter!(
        SENT,
        Unit::Count,
        "Events a publisher stored (duplicates included)."
    );
    metrics::describe_counter!(
        PUBLISH_FAILURES,
        Unit::Count,
        "Publishes that failed after their retries."
    );
    metrics::describe_counter!(
        INBOX_READS,
        Unit::Count,
        "Inbox look-ups, by kind: key or batch."
    );
    metrics::describe_counter!(
        INBOX_WRITES,
        Unit::Count,
        "Inbox writes, by kind: record or claim."
    );
}

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
    pub(crate) lag_seconds: Gauge,
}

impl HandlerMetrics {
    pub(crate) fn new(service: &str, handler: &str, durable: &str, stream: &str) -> Self {
        describe();
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
            lag_seconds: metrics::gauge!(LAG_SECONDS, labels),
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
        describe();
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
        describe();
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
