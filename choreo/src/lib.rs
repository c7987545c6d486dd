#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod codec;
pub mod envelope;
pub mod event;
pub mod headers;
pub mod id;
pub mod subject;

/// The NATS client choreo is built on, re-exported so users share its version.
pub use async_nats;

pub use codec::{DecodeError, EncodeError};
pub use envelope::{Envelope, EnvelopeError};
pub use event::Event;
pub use headers::{HeaderError, Metadata};
pub use id::{EventId, EventKey};
pub use subject::SubjectError;

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
/// | `key = field` or `key = (a, b)` | fields that make the fact unique; they fix the event id | none |
/// | `upcast_from = Old` or `upcast_from = (V1, V2)` | older versions of the same event name, converted with `From` | none |
/// | `crate = "path"` | where the `choreo` crate is, if renamed | `choreo` |
/// | `command_name_ok` | accept a name that reads as a command (`CreateOrder`) | off |
///
/// Events are facts: a name that reads as a command (`CreateOrder`,
/// `ProcessPayment`) is a compile error that suggests the past-tense fact
/// (`OrderCreated`), unless `command_name_ok` is given.
pub use choreo_macros::event;

/// Support for the code the macros generate. Not public API: it may change
/// in any release.
#[doc(hidden)]
pub mod __private {
    pub use serde;

    use crate::id::EventKey;
    use std::fmt::Display;

    pub use crate::codec::{decode_cbor, unknown_version};
    pub use crate::subject::render as render_subject;

    /// A field as `&dyn Display`; a field without `Display` fails here, at the field.
    pub fn as_display<T: Display>(value: &T) -> &dyn Display {
        value
    }

    /// Builds a key from the `Display` text of the key fields.
    pub fn event_key(parts: &[&dyn Display]) -> EventKey {
        EventKey::new(parts.iter().map(|p| p.to_string()))
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
