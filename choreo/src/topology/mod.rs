//! Topology: the name and configuration of every stream, consumer, bucket
//! and subject choreo creates or uses on the server, in one place.
//!
//! | what | name | made by |
//! | --- | --- | --- |
//! | an event type's stream | `#[event(stream = ...)]`, default the subject's first token upper-cased; subjects `<first token>.>`; kept [`DEFAULT_STREAM_MAX_AGE`] unless [`StreamSettings::max_age`] says otherwise | [`stream::ensure_stream`] |
//! | a handler's durable | `<service>--<handler>` ([`consumer_name`]) | [`consumer::create_consumer`] |
//! | a handler's lost-delivery consumer | `<service>--<handler>--lost` on [`ADVISORY_STREAM`] | [`consumer::create_advisory_consumer`] |
//! | the dead-letter stream | [`DLQ_STREAM`], subjects [`DLQ_SUBJECTS`]; a handler's letters on [`dlq_subject`]; no age limit | [`consumer::ensure_streams`] |
//! | the advisory stream | [`ADVISORY_STREAM`], subjects [`ADVISORY_SUBJECTS`], kept 7 days | [`consumer::ensure_streams`] |
//! | a service's inbox | KV bucket [`inbox_bucket`]: records in group keys [`inbox_group_key`], claims in [`inbox_key`], the group count in its stream's metadata [`GROUPS_METADATA`] | `Inbox::open` |
//!
//! `docs/deployment.md` lists the same with the permissions each needs.

pub(crate) mod consumer;
mod error;
pub(crate) mod inbox_group;
pub(crate) mod ordered;
mod permissions;
pub(crate) mod stream;

pub use error::{ConsumerError, ConsumerErrorKind, StreamError, StreamErrorKind};
pub use permissions::Permissions;
pub use stream::{DEFAULT_STREAM_MAX_AGE, StreamSettings};

pub use consumer::consumer_name;
pub use inbox_group::{DEFAULT_INBOX_GROUPS, MAX_INBOX_GROUPS, inbox_group_key};
pub(crate) use inbox_group::{GROUPS_METADATA, recorded_groups};

use crate::event::id::EventId;

/// The stream that stores dead letters.
pub const DLQ_STREAM: &str = "CHOREO_DLQ";

/// The stream of every service's deadlines (schedules, fired copies,
/// decisions): see `crate::deadline`.
pub(crate) const DEADLINE_STREAM: &str = "CHOREO_DEADLINES";
/// Its subjects: `choreo.dlq.<service>.<handler>`.
pub const DLQ_SUBJECTS: &str = "choreo.dlq.>";
/// The stream that keeps JetStream's `MAX_DELIVERIES` advisories.
pub const ADVISORY_STREAM: &str = "CHOREO_ADVISORIES";
/// The advisories it keeps.
pub(crate) const ADVISORY_SUBJECTS: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";

/// The registry's bucket (also `choreo::registry::BUCKET`).
pub(crate) const REGISTRY_BUCKET: &str = "choreo_registry";
/// Where publishers record their root events (`choreo::registry::PUBLISHERS_BUCKET`).
pub(crate) const PUBLISHERS_BUCKET: &str = "choreo_publishers";

/// Where `choreo replay` leaves a marker for a handler's instances.
pub(crate) const REPLAYS_BUCKET: &str = "choreo_replays";

/// The marker's key: `<service>.<handler>`.
pub(crate) fn replay_key(service: &str, handler: &str) -> String {
    format!("{service}.{handler}")
}

/// What a replay marker says: the stream sequences being replayed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReplayMarker {
    pub(crate) from: u64,
    pub(crate) until: u64,
    pub(crate) rerun: bool,
    pub(crate) at_ms: u64,
    /// When the handler was rewound (the marker is written again then);
    /// 0 before, and in markers written before choreo recorded it.
    #[serde(default)]
    pub(crate) rewound_at_ms: u64,
    /// Whether the handler is ordered (its range was copied into its
    /// partitions rather than rewound).
    #[serde(default)]
    pub(crate) ordered: bool,
    /// The stream the handler reads and its durable.
    #[serde(default)]
    pub(crate) stream: String,
    #[serde(default)]
    pub(crate) durable: String,
}

/// The subject of a handler's dead letters.
pub fn dlq_subject(service: &str, handler: &str) -> String {
    format!("choreo.dlq.{service}.{handler}")
}

/// The subject of the `MAX_DELIVERIES` advisories of one durable.
pub(crate) fn advisory_subject(stream: &str, durable: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}")
}

/// The bucket name of a service's inbox.
pub fn inbox_bucket(service: &str) -> String {
    format!("choreo_inbox_{service}")
}

/// The key of one handler's claim on one event while it runs (and, in
/// buckets written before records were grouped, its record).
pub fn inbox_key(handler: &str, event: EventId) -> String {
    format!("{handler}.{event}")
}
