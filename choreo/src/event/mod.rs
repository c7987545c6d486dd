//! Events: the [`Event`] trait that `#[event]` implements, event ids and
//! keys ([`id`]), subject templates ([`subject`]), and what can go wrong
//! encoding or decoding one ([`error`]). Nothing here touches NATS.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) mod error;
pub(crate) mod id;
pub(crate) mod subject;

pub use error::{DecodeError, DecodeErrorKind, EncodeError, HeaderError, HeaderErrorKind};
pub use id::{EventId, EventKey};
pub use subject::{SubjectError, SubjectErrorKind, TokenProblem};

/// A fact that services publish and react to.
///
/// Implement it with [`#[event]`](macro@crate::event); a hand-written impl must keep
/// the same rules (see `docs/wire-format.md`). The constants describe the type;
/// the methods read one value.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a choreo event",
    label = "not a choreo event",
    note = "annotate the type's definition with `#[choreo::event(subject = \"...\")]`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event's name, written in `ce-type`. The same for every version.
    const NAME: &'static str;
    /// The schema version of this type, written in `ce-eventversion`; at least 1.
    const VERSION: u32;
    /// The subject template, e.g. `orders.{order_id}.placed`.
    const SUBJECT: &'static str;
    /// The template's wildcard form that subscribers use, e.g. `orders.*.placed`.
    const SUBJECT_FILTER: &'static str;
    /// The JetStream stream that stores the event.
    const STREAM: &'static str;
    /// The subjects of that stream when choreo creates it: `stream_subjects`
    /// if the attribute gives it, else the template's first token followed by
    /// `.>`, which every event type with that first token shares. A stream
    /// whose one subject is [`Event::SUBJECT_FILTER`] stores this type only,
    /// and a handler's consumer on it costs the server less per event when
    /// the subjects are many (docs/benchmarks.md, "What a shared stream
    /// costs").
    const STREAM_SUBJECTS: &'static str;

    /// This event's subject: the template with every `{field}` filled in.
    ///
    /// # Errors
    /// A field value that is not a legal NATS token.
    fn subject(&self) -> Result<String, SubjectError>;

    /// The fields that fill the subject template's `{field}` tokens, in
    /// order (what an ordered handler partitions by).
    const PLACEHOLDERS: &'static [&'static str] = &[];

    /// The fields of [`key`](Self::key), in order; empty without a key.
    const KEY_FIELDS: &'static [&'static str] = &[];

    /// The values of the type's `key` fields, if it declares a key.
    fn key(&self) -> Option<EventKey> {
        None
    }

    /// Whether a payload of schema `version` can be decoded into this type,
    /// directly or through an `upcast_from` chain.
    fn accepts_version(version: u32) -> bool {
        version == Self::VERSION
    }

    /// Decodes a CBOR payload written with schema `version`, directly or
    /// through the `upcast_from` chain. `#[event]` writes it; a hand-written
    /// impl decodes its own version with `serde` from CBOR and returns
    /// [`DecodeError::UnknownVersion`] for any other.
    ///
    /// # Errors
    /// An unknown version, or a payload that is not this type in CBOR.
    fn decode_payload(version: u32, payload: &[u8]) -> Result<Self, DecodeError>;

    /// The payload's JSON Schema (draft-07, subschemas inlined), which
    /// `choreo asyncapi` puts in its document and the registry carries.
    /// `#[event(schema)]` fills it from the type's `schemars::JsonSchema`
    /// (choreo's `schemars` feature); `None` otherwise.
    fn schema() -> Option<serde_json::Value> {
        None
    }
}

/// An event type's description as data: what a handler declares it emits
/// (`#[event_handler(emits = [..])]`), and what the permissions and the
/// registry are built from.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct EventType {
    /// [`Event::NAME`].
    pub name: &'static str,
    /// [`Event::VERSION`].
    pub version: u32,
    /// [`Event::SUBJECT`].
    pub subject: &'static str,
    /// [`Event::SUBJECT_FILTER`].
    pub subject_filter: &'static str,
    /// [`Event::STREAM`].
    pub stream: &'static str,
    /// [`Event::STREAM_SUBJECTS`].
    pub stream_subjects: &'static str,
    /// [`Event::schema`].
    pub schema: fn() -> Option<serde_json::Value>,
}

/// Two descriptions are equal when every field but the schema function is.
impl PartialEq for EventType {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for EventType {}

impl std::hash::Hash for EventType {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity().hash(state);
    }
}

impl EventType {
    #[allow(clippy::type_complexity)]
    fn identity(&self) -> (&str, u32, &str, &str, &str, &str) {
        (
            self.name,
            self.version,
            self.subject,
            self.subject_filter,
            self.stream,
            self.stream_subjects,
        )
    }

    /// The description of `E`.
    pub const fn of<E: Event>() -> Self {
        Self {
            name: E::NAME,
            version: E::VERSION,
            subject: E::SUBJECT,
            subject_filter: E::SUBJECT_FILTER,
            stream: E::STREAM,
            stream_subjects: E::STREAM_SUBJECTS,
            schema: E::schema,
        }
    }
}

/// An event type as the registry stores it: [`EventType`] as owned,
/// serializable data.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct EventManifest {
    /// `ce-type`.
    pub event: String,
    /// The schema version.
    pub version: u32,
    /// The subject template.
    pub subject: String,
    /// Its wildcard form.
    pub subject_filter: String,
    /// The stream that stores it.
    pub stream: String,
    /// The payload's JSON Schema, when the type provides one
    /// ([`Event::schema`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

impl From<&EventType> for EventManifest {
    fn from(t: &EventType) -> Self {
        Self {
            event: t.name.to_owned(),
            version: t.version,
            subject: t.subject.to_owned(),
            subject_filter: t.subject_filter.to_owned(),
            stream: t.stream.to_owned(),
            schema: (t.schema)(),
        }
    }
}

/// A duration to one decimal in its largest unit: `3.5 days`, `2.5 s`.
pub(crate) fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    match s {
        s if s >= 86_400.0 => format!("{:.1} days", s / 86_400.0),
        s if s >= 3_600.0 => format!("{:.1} h", s / 3_600.0),
        s if s >= 60.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.1} s"),
    }
}

/// `n` and its noun, singular or plural: `1 event`, `2 events`. (For the
/// `choreo` tool's messages; not part of the stable API.)
///
/// ```
/// assert_eq!(choreo::__private::counted(1, "letter"), "1 letter");
/// assert_eq!(choreo::__private::counted(0, "letter"), "0 letters");
/// ```
pub fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// When something `left` from now happens: `in 2.5 s`, or `any moment now`
/// once nothing is left.
pub(crate) fn human_until(left: std::time::Duration) -> String {
    if left.is_zero() {
        "any moment now".to_owned()
    } else {
        format!("in {}", human_duration(left))
    }
}

/// Unix time in milliseconds (0 before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
