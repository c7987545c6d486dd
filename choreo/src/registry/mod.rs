//! The registry: a service described as data ([`Manifest`], what
//! [`Service::manifest`](crate::Service::manifest) returns without a
//! server, so CI can read a service's handlers, what they consume and emit,
//! and their options offline), and each running instance's record in the
//! KV bucket [`BUCKET`] ([`instances`]).

use serde::{Deserialize, Serialize};

mod live;
mod outbox;

pub use live::host_name;
pub use live::{
    BUCKET, HEARTBEAT, Instance, MAX_AGE, PUBLISHERS_BUCKET, PublishedEvent, RegistryError,
    instances, publishers,
};
pub(crate) use live::{Record, heartbeat, now_ms};
pub use outbox::{OutboxReport, outboxes, report_outbox};

pub use crate::event::EventManifest;
use crate::handler::{DeliverPolicy, HandlerOptions};

/// A service's description: its handlers, what each consumes and emits,
/// and their options. Serializes to JSON with [`to_json`](Self::to_json).
///
/// ```
/// use choreo::{event, event_handler, Context, Service};
///
/// #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// pub struct OrderPlaced { pub order_id: String }
///
/// #[event(subject = "payments.{order_id}.captured", key = order_id)]
/// pub struct PaymentCaptured { pub order_id: String }
///
/// #[event_handler(emits = [PaymentCaptured], max_deliver = 3)]
/// async fn charge(order: OrderPlaced, ctx: Context) {
///     ctx.emit(PaymentCaptured { order_id: order.order_id });
/// }
///
/// let manifest = Service::new("payments").handler(charge).manifest();
/// let h = &manifest.handlers[0];
/// assert_eq!(h.durable, "payments--charge");
/// assert_eq!(h.consumes.event, "OrderPlaced");
/// assert_eq!(h.emits.as_ref().unwrap()[0].event, "PaymentCaptured");
/// assert_eq!(h.options.max_deliver, 3);
/// println!("{}", manifest.to_json());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Manifest {
    /// The service's name.
    pub service: String,
    /// The choreo version that built it.
    pub choreo_version: String,
    /// Its handlers, in the order they were added.
    pub handlers: Vec<HandlerManifest>,
    /// The aggregates it answers state requests for
    /// ([`Service::aggregate`](crate::Service::aggregate)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregates: Vec<AggregateManifest>,
}

/// An aggregate type a service answers state requests for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AggregateManifest {
    /// Its `Aggregate::NAME`.
    pub name: String,
    /// Where an instance's events are: its `Aggregate::filter` with
    /// `{id}` in place of the id (`stock.{id}.*`).
    pub filter: String,
    /// The stream they are stored in.
    pub stream: String,
}

impl AggregateManifest {
    /// The subject filter of instance `id`.
    pub fn filter_of(&self, id: &str) -> String {
        self.filter.replace("{id}", id)
    }
}

/// One handler in a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandlerManifest {
    /// The handler's name.
    pub name: String,
    /// Its durable consumer, `<service>--<handler>`.
    pub durable: String,
    /// The event it consumes, and the versions it accepts (through
    /// `upcast_from`).
    pub consumes: ConsumedEvent,
    /// What it declares it emits (`emits = [..]`); `None`: undeclared.
    pub emits: Option<Vec<EventManifest>>,
    /// Its options.
    pub options: OptionsManifest,
    /// For a deadline handler: the deadline it runs on. Its `consumes`
    /// names A, read from the deadline stream's fired copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DeadlineManifest>,
    /// For a consumer choreo runs as part of a deadline handler (its
    /// schedule step `<handler>__schedule`, or a B watcher
    /// `<handler>__met_<B>`): that handler's name. `status`, `graph` and
    /// `asyncapi` show it under its handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
}

/// A deadline handler's deadline in a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadlineManifest {
    /// How long after A a B may come, milliseconds.
    pub within_ms: u64,
    /// The `ce-type`s of the events that cancel it.
    pub unless: Vec<String>,
    /// `correlation` or `key`.
    pub matched_by: String,
}

impl From<&crate::handler::Deadline> for DeadlineManifest {
    fn from(d: &crate::handler::Deadline) -> Self {
        Self {
            within_ms: u64::try_from(d.within.as_millis()).unwrap_or(u64::MAX),
            unless: d.unless.iter().map(|t| t.name.to_owned()).collect(),
            matched_by: match d.matched_by {
                crate::handler::MatchBy::Key => "key",
                _ => "correlation",
            }
            .to_owned(),
        }
    }
}

/// The event a handler consumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConsumedEvent {
    /// `ce-type`.
    pub event: String,
    /// The newest version it reads.
    pub version: u32,
    /// Every version it reads, directly or through `upcast_from`.
    pub accepts_versions: Vec<u32>,
    /// The subject template of the version it reads
    /// (`orders.{order_id}.placed`).
    #[serde(default)]
    pub subject: String,
    /// The subject filter of its consumer.
    pub subject_filter: String,
    /// The stream it reads.
    pub stream: String,
    /// The payload's JSON Schema, when the type provides one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

/// A handler's options in a [`Manifest`], durations in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OptionsManifest {
    /// [`HandlerOptions::concurrency`].
    pub concurrency: usize,
    /// [`HandlerOptions::max_deliver`].
    pub max_deliver: u32,
    /// [`HandlerOptions::backoff`].
    pub backoff_ms: Vec<u64>,
    /// [`HandlerOptions::ack_wait`].
    pub ack_wait_ms: u64,
    /// [`HandlerOptions::timeout`].
    pub timeout_ms: u64,
    /// [`HandlerOptions::deliver`]: `all`, `new` or an RFC 3339 time.
    pub deliver: String,
    /// [`HandlerOptions::idempotent`].
    pub idempotent: bool,
    /// The fields an ordered handler orders by (empty: any order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ordered_by: Vec<String>,
    /// An ordered handler's partitions (0: any order).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub partitions: u16,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

impl Manifest {
    /// The manifest as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&HandlerOptions> for OptionsManifest {
    fn from(o: &HandlerOptions) -> Self {
        Self {
            concurrency: o.concurrency,
            max_deliver: o.max_deliver,
            backoff_ms: o.backoff.iter().copied().map(millis).collect(),
            ack_wait_ms: millis(o.ack_wait),
            timeout_ms: millis(o.timeout),
            deliver: match o.deliver {
                DeliverPolicy::All => "all".to_owned(),
                DeliverPolicy::New => "new".to_owned(),
                DeliverPolicy::Since(t) => t
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            },
            idempotent: o.idempotent,
            ordered_by: o
                .ordered
                .iter()
                .flat_map(|x| x.by.iter().map(|f| (*f).to_owned()))
                .collect(),
            partitions: o.ordered.map_or(0, |x| x.partitions),
        }
    }
}
