#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Implements `Debug` as the error's message (`{:?}` is what a test that
/// returns the error prints), and as the derived field list with `{:#?}`.
macro_rules! debug_as_display {
    ($t:ty) => {
        impl ::std::fmt::Debug for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Display::fmt(self, f)?;
                let mut source = ::std::error::Error::source(self);
                if f.alternate() {
                    while let Some(s) = source {
                        write!(f, "\n  caused by: {s}")?;
                        source = s.source();
                    }
                }
                Ok(())
            }
        }
    };
}
pub(crate) use debug_as_display;

// The layers, lowest first; each uses only those above it in this list
// (`tests/layout.rs` checks it).
mod event;
mod nats;
pub mod observe;
mod wire;

mod topology;

mod publish;

mod handler;

pub mod aggregate;

pub mod admin;
mod deadline;
pub mod dlq;
mod inbox;
pub mod registry;

mod runtime;

mod service;

/// The NATS client choreo is built on, re-exported so users share its version.
pub use async_nats;

pub use aggregate::{
    Aggregate, AggregateError, AggregateErrorKind, AggregateEvent, Aggregates, Appended, At,
    Boundaries, DecideError, Decided, Decider, EventVisitor, Loaded, Recorded,
};
pub use deadline::DEFAULT_DEADLINE_RETENTION;
pub use event::error::CodecFailure;
pub use event::subject::MAX_SUBJECT_LEN;
pub use event::{
    DecodeError, DecodeErrorKind, EncodeError, Event, EventId, EventKey, EventType, HeaderError,
    HeaderErrorKind, SubjectError, SubjectErrorKind, TokenProblem,
};
pub use handler::{
    Attempt, BoxFuture, Context, DEFAULT_PARTITIONS, DEFAULT_TIMEOUT, Deadline, DeadlineHandler,
    DeliverPolicy, Emission, EmittedEvent, EventArg, FromContext, Handler, HandlerError,
    HandlerErrorKind, HandlerOptions, IntoHandlerResult, MatchBy, MissingState, Ordered, State,
    States, Unless, UnlessVisitor,
};
pub use inbox::{DEFAULT_RETENTION as DEFAULT_INBOX_RETENTION, InboxError, InboxErrorKind};
pub use nats::{ConnectError, ConnectErrorKind, JetStreamApi, Source, connect};
pub use publish::{
    BatchOutcome, PUBLISH_ALL_IN_FLIGHT, PublishError, PublishErrorKind, Publisher, Receipt,
};
pub use runtime::HandlerStats;
pub use service::{
    DEFAULT_SERVER_BUDGET, RunError, RunErrorKind, Service, ServiceHandle, StartError,
    StartErrorKind,
};
pub use topology::ordered::WINDOW as PARTITION_WINDOW;
pub use topology::{
    ConsumerError, ConsumerErrorKind, DEFAULT_INBOX_GROUPS, DEFAULT_STREAM_MAX_AGE,
    MAX_INBOX_GROUPS, Permissions, StreamError, StreamErrorKind, StreamSettings,
};
pub use wire::envelope::{Envelope, EnvelopeError, EnvelopeErrorKind};
pub use wire::headers::Metadata;

/// The payload codec: events travel as CBOR (RFC 8949), written from the
/// type's serde shape (a struct is a map keyed by field name).
pub mod codec {
    pub use crate::wire::codec::{CONTENT_TYPE, decode, encode};
}

/// The header names of the wire format (CloudEvents 1.0 in binary mode)
/// and the rule for a `ce-source`. `docs/wire-format.md` is the contract.
pub mod headers {
    pub use crate::wire::headers::{
        CE_CAUSATIONID, CE_CORRELATIONID, CE_EVENTVERSION, CE_ID, CE_SOURCE, CE_SPECVERSION,
        CE_TIME, CE_TYPE, CHOREO_REPLAY, CONTENT_TYPE, NATS_MSG_ID, SPEC_VERSION, TRACEPARENT,
        check_source,
    };
}

/// Unit-testing handlers without a server. Needs the `test-util` feature
/// (add `choreo = { version = "...", features = ["test-util"] }` under
/// `[dev-dependencies]`).
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing {
    pub use crate::handler::testing::{HandlerTest, TestRun};
}

/// The names most handlers and services use: `use choreo::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Attempt, Context, Envelope, Event, EventId, HandlerError, Metadata, Publisher, Service,
        State, event, event_handler,
    };
}

/// Marks a type as a choreo event and implements [`Event`] for it.
///
/// ```
/// use choreo::event;
///
/// #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// pub struct OrderPlaced {
///     pub order_id: String,
///     pub total_cents: u64,
/// }
/// ```
///
/// The attribute also derives `serde::Serialize` and `serde::Deserialize`
/// through choreo's own re-export, so the user's crate needs no serde
/// dependency. Options (each at most once):
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `subject = "a.{field}.b"` | subject template; `{field}` tokens are filled from fields (which must implement `Display`) | required |
/// | `name = "..."` | event name in `ce-type` | the type name |
/// | `version = N` | schema version, a positive integer | `1` |
/// | `stream = "..."` | JetStream stream | the first subject token upper-cased |
/// | `stream_subjects = "..."` | the stream's subjects when choreo creates it; must start with the template's first token and store every subject of the template (checked at compile time) | the first token and `.>` |
/// | `key = field` or `key = (a, b)` | fields that make the fact unique; they fix the event id | none |
/// | `upcast_from = Old` or `upcast_from = (V1, V2)` | older versions of the same event name, converted with `From` | none |
/// | `crate = "path"` | where the `choreo` crate is, if renamed | `choreo` |
/// | `command_name_ok` | accept a name that reads as a command (`CreateOrder`) | off |
///
/// Events are facts: a name that reads as a command (`CreateOrder`,
/// `ProcessPayment`) is a compile error that suggests the past-tense fact
/// (`OrderCreated`), unless `command_name_ok` is given.
pub use choreo_macros::event;

/// Turns an `async fn` into a handler that [`Service::handler`] takes.
///
/// ```
/// use choreo::{event, event_handler, Context, HandlerError, State};
///
/// #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// pub struct OrderPlaced { pub order_id: String, pub total_cents: u64 }
///
/// #[event(subject = "payments.{order_id}.captured", key = order_id)]
/// pub struct PaymentCaptured { pub order_id: String }
///
/// #[derive(Clone)]
/// struct Gateway;
///
/// #[event_handler(concurrency = 32, max_deliver = 5, backoff = ["1s", "10s"])]
/// async fn charge_payment(
///     order: OrderPlaced,
///     ctx: Context,
///     State(_gateway): State<Gateway>,
/// ) -> Result<(), HandlerError> {
///     // charge with ctx.idempotency_key() so a retry cannot charge twice
///     ctx.emit(PaymentCaptured { order_id: order.order_id });
///     Ok(())
/// }
/// ```
///
/// The first argument is the event, or `Envelope<Event>` to see its metadata;
/// the others are extractors: [`Context`], [`State<T>`](State), [`Metadata`],
/// [`Attempt`]. The return type is `()` or `Result<(), E>` with
/// `E: Into<HandlerError>`. The function stays callable as
/// `charge_payment(order, ctx, state).await` for unit tests (see
/// `choreo::testing::HandlerTest`, feature `test-util`).
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `name = "..."` | handler name: part of the durable consumer `<service>--<name>` and of emitted ids | the fn name |
/// | `concurrency = N` | events handled at once per instance (1–10000) | 256 |
/// | `max_deliver = N` | deliveries before the dead-letter stream (1–10000) | 5 |
/// | `backoff = ["1s", "5s"]` | delay before redelivery after the n-th failure; the last repeats | 1s, 5s, 30s |
/// | `ack_wait = "30s"` | silence before JetStream redelivers (in-progress acks are sent meanwhile); an instance's events resume elsewhere about one `ack_wait` after it dies | 30s |
/// | `timeout = "5m"` | how long one invocation may run before it is abandoned and retried (dead letter reason `timeout` on the last delivery) | 5m |
/// | `deliver = all` / `new` | where a new consumer starts | `all` |
/// | `deliver_since = "RFC 3339"` | a new consumer starts at this time | |
/// | `idempotent = false` | turn the inbox off for this handler | on |
/// | `ordered_by = account` (or `(a, b)`) | events with equal fields run one at a time, in stream order, across all instances; each field must fill a `{field}` of the subject (`docs/ordering.md`) | any order |
/// | `partitions = N` | an ordered handler's partitions: how many orderings run at once (1–1024) | 16 |
/// | `emits = [A, B]` (or `emits = A`) | the event types it may emit: emitting another fails it permanently (dead letter `emit-failed`, naming the type and the declaration; `HandlerTest` returns the same error), and `Service::permissions` includes their subjects | undeclared |
/// | `within = "15m"` | makes it a deadline handler: it runs with its event A when no `unless` event was stored within this long after A was (at least 1 s); register it with [`Service::deadline`] (`docs/deadlines.md`) | |
/// | `unless = B` (or `unless = [B, C]`, up to four) | with `within`: the events that, stored in time, cancel the deadline | |
/// | `matched_by = correlation` / `key` | with `within`: how a B is matched to its A, by the flow's correlation id or by equal `key`s (both types must declare one) | `correlation` |
/// | `crate = "path"` | where `choreo` is, if renamed | `choreo` |
pub use choreo_macros::event_handler;

/// `Some(schema::<T>())`, or with the `schemars` feature off, an error
/// on `#[event(schema)]`.
#[cfg(feature = "schemars")]
#[doc(hidden)]
#[macro_export]
macro_rules! __schema_of {
    ($t:ty) => {
        ::core::option::Option::Some($crate::__private::schema::<$t>())
    };
}

#[cfg(not(feature = "schemars"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __schema_of {
    ($t:ty) => {
        ::core::compile_error!(
            "`#[event(schema)]` needs choreo's `schemars` feature: choreo = { version = \"0.1\", features = [\"schemars\"] }, and `#[derive(schemars::JsonSchema)]` on the event"
        )
    };
}

/// Support for the code the macros generate. Not public API: it may change
/// in any release.
#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use serde_json;

    pub use crate::__schema_of as schema_of;

    /// `T`'s JSON Schema for [`Event::schema`](crate::Event::schema):
    /// draft-07, every subschema inlined (an AsyncAPI document embeds it,
    /// where a `#/definitions/..` reference would point elsewhere), no
    /// `$schema` key.
    #[cfg(feature = "schemars")]
    pub fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        let mut settings = schemars::generate::SchemaSettings::draft07();
        settings.inline_subschemas = true;
        let schema = settings.into_generator().into_root_schema_for::<T>();
        let mut value = schema.to_value();
        if let Some(map) = value.as_object_mut() {
            map.remove("$schema");
        }
        value
    }

    use crate::event::id::EventKey;
    use std::fmt::Display;

    pub use crate::admin::trace::{Arrow, sequence_diagram};
    pub use crate::event::counted;
    pub use crate::event::subject::{check_token, covers};
    pub use crate::handler::BoxFuture;
    use crate::handler::{DeliverPolicy, HandlerError};
    pub use crate::runtime::{FaultHook, FaultPoint};
    pub use crate::service::footprint::human as human_bytes;
    pub use crate::topology::{consumer_name, inbox_bucket, inbox_group_key, inbox_key};
    pub use crate::wire::codec::{decode_cbor, unknown_version};

    /// When `handler` of `service` recorded `event` in its inbox (unix ms),
    /// if it did: for tests and tools that check the inbox.
    pub async fn inbox_handled_at(
        js: &async_nats::jetstream::Context,
        service: &str,
        handler: &str,
        event: crate::EventId,
    ) -> Option<u64> {
        crate::inbox::View::open(js, service)
            .await?
            .handled_at(handler, event)
            .await
    }

    /// How many events `handler` of `service` has recorded in its inbox (a
    /// full scan of its groups: for tests and benchmarks).
    pub async fn inbox_records(
        js: &async_nats::jetstream::Context,
        service: &str,
        handler: &str,
    ) -> Result<u64, crate::Source> {
        match crate::inbox::View::open(js, service).await {
            Some(v) => v.records(handler).await,
            None => Ok(0),
        }
    }

    /// A handler future that fails at once (an extractor failed).
    pub fn ready_err(e: HandlerError) -> BoxFuture<Result<(), HandlerError>> {
        Box::pin(std::future::ready(Err(e)))
    }

    /// `DeliverPolicy::Since` from a checked Unix time in nanoseconds.
    pub fn deliver_since(unix_nanos: i128) -> DeliverPolicy {
        time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos)
            .map_or(DeliverPolicy::All, DeliverPolicy::Since)
    }
    pub use crate::event::subject::render as render_subject;

    /// A field as `&dyn Display`; a field without `Display` fails here, at the field.
    pub fn as_display<T: Display>(value: &T) -> &dyn Display {
        value
    }

    /// Builds a key from the `Display` text of the key fields.
    pub fn event_key(parts: &[&dyn Display]) -> EventKey {
        EventKey::new(parts.iter().map(|p| p.to_string()))
    }

    /// Const check for `#[event_handler(ordered_by = ..)]`: every ordering
    /// field fills a `{field}` of the subject, and there is at least one.
    pub const fn orderable<E: crate::Event>(fields: &[&str]) -> bool {
        if fields.is_empty() {
            return false;
        }
        let mut i = 0;
        while i < fields.len() {
            if crate::handler::placeholder_index(E::PLACEHOLDERS, fields[i]).is_none() {
                return false;
            }
            i += 1;
        }
        true
    }

    /// Const check that `upcast_from` names an older version of the same event.
    pub const fn upcast_is_valid(
        old_name: &str,
        old_version: u32,
        name: &str,
        version: u32,
    ) -> bool {
        let (a, b) = (old_name.as_bytes(), name.as_bytes());
        if a.len() != b.len() || old_version >= version {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
