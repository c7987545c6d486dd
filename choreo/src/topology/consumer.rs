//! Consumers: each handler's durable and its lost-delivery consumer.

use async_nats::jetstream::{self, consumer::pull};

use super::error::{ConsumerError, StreamError};
use super::stream::{StreamSettings, ensure_stream};
use super::{
    ADVISORY_STREAM, ADVISORY_SUBJECTS, DLQ_STREAM, DLQ_SUBJECTS, advisory_subject, dlq_subject,
};

/// What a handler's durable is made with: its options, in JetStream's terms.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerSpec {
    pub(crate) ack_wait: std::time::Duration,
    pub(crate) max_deliver: u32,
    pub(crate) concurrency: usize,
    /// Where a new durable starts.
    pub(crate) deliver: jetstream::consumer::DeliverPolicy,
}

/// The durable consumer name of a handler: `<service>--<handler>`. Handler
/// names are Rust identifiers (no `-`), so the last `--` separates the two.
pub fn consumer_name(service: &str, handler: &str) -> String {
    format!("{service}--{handler}")
}

/// Creates the handler's durable, or updates it to these options.
///
/// Where a new durable starts is the handler's `deliver` policy, or
/// `start_at` (a stream sequence) when the runtime recreates a durable an
/// operator deleted: just after its last known ack floor, so nothing
/// acknowledged is delivered again from the start of the stream. An
/// existing durable keeps its position (its deliver policy cannot change).
/// The options written are the ones every instance then follows, read back
/// from the server (see `Live`).
pub(crate) async fn create_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    o: &ConsumerSpec,
    handler: &str,
    start_at: Option<u64>,
) -> Result<jetstream::consumer::PullConsumer, ConsumerError> {
    let mut deliver_policy = match start_at {
        Some(seq) if seq > 1 => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        _ => o.deliver,
    };
    let config = pull::Config {
        durable_name: Some(durable.to_owned()),
        description: Some(format!("choreo handler {durable}")),
        filter_subject: filter.to_owned(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: o.ack_wait,
        max_deliver: i64::from(o.max_deliver),
        deliver_policy,
        max_ack_pending: i64::try_from(o.concurrency.saturating_mul(4).max(1000))
            .unwrap_or(i64::MAX),
        ..Default::default()
    };
    let client = js.client();
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| ConsumerError::new(&client, handler, stream, durable, e))?;
    if let Ok(mut existing) = s.get_consumer::<pull::Config>(durable).await
        && let Ok(info) = existing.info().await
    {
        deliver_policy = info.config.deliver_policy;
    }
    let config = pull::Config {
        deliver_policy,
        ..config
    };
    s.create_consumer(config)
        .await
        .map_err(|e| ConsumerError::new(&client, handler, stream, durable, e))
}

/// Creates the consumer of `durable`'s lost-delivery advisories.
pub(crate) async fn create_advisory_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    handler: &str,
) -> Result<jetstream::consumer::PullConsumer, ConsumerError> {
    let client = js.client();
    let name = format!("{durable}--lost");
    let s = js
        .get_stream(ADVISORY_STREAM)
        .await
        .map_err(|e| ConsumerError::new(&client, handler, ADVISORY_STREAM, &name, e))?;
    s.create_consumer(advisory_consumer(stream, durable))
        .await
        .map_err(|e| ConsumerError::new(&client, handler, ADVISORY_STREAM, &name, e))
}

/// Creates the dead-letter and advisory streams if missing.
pub(crate) async fn ensure_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), StreamError> {
    // Letters stay until replayed or purged: one is an event nobody has
    // handled yet, and letters number the failures, not the events.
    let letters = settings.clone().max_age(std::time::Duration::ZERO);
    ensure_stream(
        js,
        &letters,
        DLQ_STREAM,
        vec![DLQ_SUBJECTS.to_owned()],
        &dlq_subject("x", "y"),
    )
    .await?;
    // Advisories are kept as long as events are by default, a week: a
    // stopped service that starts again within it dead-letters what they
    // name, as it still finds the events.
    let advisory = settings.clone().max_age(super::DEFAULT_STREAM_MAX_AGE);
    ensure_stream(
        js,
        &advisory,
        ADVISORY_STREAM,
        vec![ADVISORY_SUBJECTS.to_owned()],
        &advisory_subject("x", "y"),
    )
    .await
}

/// The advisory consumer of one handler's durable.
pub(crate) fn advisory_consumer(stream: &str, durable: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(format!("{durable}--lost")),
        description: Some(format!(
            "choreo: dead-letters events lost on their last delivery to {durable}"
        )),
        filter_subject: advisory_subject(stream, durable),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        max_deliver: 100,
        ..Default::default()
    }
}
