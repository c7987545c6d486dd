//! Event identifiers and the rules that derive them.
//!
//! Event ids are part of the wire contract (see `docs/wire-format.md`): other
//! programs recompute them, and JetStream deduplicates on them. Three rules
//! apply, in this order:
//!
//! 1. an event type with a `key`: [`EventId::keyed`], a name-based UUID (v5)
//!    of the event name and the key values, so every publish of one fact, and
//!    every version of it, is one event;
//! 2. an event emitted by a handler: [`EventId::emitted`], a name-based UUID of
//!    the handler id, the causing event's id, the emitted event's name and its
//!    index among that invocation's emissions of that name, so a redelivered
//!    handler re-emits the very same ids;
//! 3. otherwise [`EventId::new_random`], a time-ordered random UUID (v7).
//!
//! Name-based ids hash a list of parts in one fixed layout: each part is
//! written as its length in bytes (4-byte big-endian unsigned integer)
//! followed by its UTF-8 bytes. The first part names the rule (`key` or
//! `emit`). The namespace is [`EventId::NAMESPACE`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How many events of each type one handled event (or one decision) has
/// emitted so far: the index an emission's deterministic id is derived
/// from. One event emits few types, so a list rather than a map.
#[derive(Debug, Default)]
pub(crate) struct EmitCounts(Vec<(&'static str, u32)>);

impl EmitCounts {
    /// The index of the next event of type `name`, counted.
    pub(crate) fn next(&mut self, name: &'static str) -> u32 {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => {
                let index = *count;
                *count += 1;
                index
            }
            None => {
                self.0.push((name, 1));
                0
            }
        }
    }
}

/// The identity of one event: a UUID, written in the `ce-id` and
/// `Nats-Msg-Id` headers in its lower-case hyphenated form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

/// The values of an event's `key` fields, in declaration order, as their
/// `Display` text. Two events with the same name and key are the same fact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventKey(Vec<String>);

impl EventKey {
    /// A key from its parts, in order.
    pub fn new<I, S>(parts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(parts.into_iter().map(Into::into).collect())
    }

    /// The key's parts, in order.
    pub fn parts(&self) -> &[String] {
        &self.0
    }
}

impl EventId {
    /// The namespace of every name-based event id:
    /// `UUIDv5(NAMESPACE_URL, "urn:choreo:event-id:v1")`.
    pub const NAMESPACE: Uuid = uuid::uuid!("d4d24400-673e-5162-8b61-a6388e27565d");

    /// The id of a keyed fact: rule 1.
    ///
    /// ```
    /// use choreo::{EventId, EventKey};
    /// let a = EventId::keyed("OrderPlaced", &EventKey::new(["o-1"]));
    /// let b = EventId::keyed("OrderPlaced", &EventKey::new(["o-1"]));
    /// assert_eq!(a, b);
    /// ```
    pub fn keyed(event_name: &str, key: &EventKey) -> Self {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + key.0.len());
        parts.push(b"key");
        parts.push(event_name.as_bytes());
        parts.extend(key.0.iter().map(|p| p.as_bytes()));
        Self::from_parts(&parts)
    }

    /// The id of the `index`-th event named `event_name` that handler
    /// `handler_id` emitted while handling event `cause`: rule 2.
    pub fn emitted(handler_id: &str, cause: EventId, event_name: &str, index: u32) -> Self {
        let cause = cause.to_string();
        let index = index.to_string();
        Self::from_parts(&[
            b"emit",
            handler_id.as_bytes(),
            cause.as_bytes(),
            event_name.as_bytes(),
            index.as_bytes(),
        ])
    }

    /// A fresh, time-ordered id (UUID v7): rule 3.
    pub fn new_random() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps a UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The last eight hex digits, for logs and flow trees. (The last ones:
    /// a v7 id starts with its timestamp, so ids made in the same minute
    /// share their first digits.)
    pub fn short(&self) -> String {
        let s = self.0.simple().to_string();
        s[s.len() - 8..].to_owned()
    }

    pub(crate) fn from_parts(parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| 4 + p.len()).sum();
        let mut name = Vec::with_capacity(len);
        for part in parts {
            let n = u32::try_from(part.len()).unwrap_or(u32::MAX);
            name.extend_from_slice(&n.to_be_bytes());
            name.extend_from_slice(part);
        }
        Self(Uuid::new_v5(&Self::NAMESPACE, &name))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0.hyphenated())
    }
}

impl FromStr for EventId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl From<Uuid> for EventId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::{EmitCounts, EventId, EventKey};

    #[test]
    fn each_type_of_emission_is_counted_apart_from_zero() {
        let mut c = EmitCounts::default();
        assert_eq!(
            [
                c.next("A"),
                c.next("B"),
                c.next("A"),
                c.next("A"),
                c.next("B")
            ],
            [0, 0, 1, 2, 1]
        );
    }

    #[test]
    fn namespace_is_derived_as_documented() {
        assert_eq!(
            EventId::NAMESPACE,
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:choreo:event-id:v1")
        );
    }

    #[test]
    fn parts_are_length_prefixed_so_boundaries_matter() {
        let a = EventId::keyed("E", &EventKey::new(["ab", "c"]));
        let b = EventId::keyed("E", &EventKey::new(["a", "bc"]));
        assert_ne!(a, b);
    }

    #[test]
    fn emitted_ids_differ_by_index_and_name() {
        let cause = EventId::new_random();
        let a = EventId::emitted("payments.charge", cause, "PaymentCaptured", 0);
        assert_eq!(
            a,
            EventId::emitted("payments.charge", cause, "PaymentCaptured", 0)
        );
        assert_ne!(
            a,
            EventId::emitted("payments.charge", cause, "PaymentCaptured", 1)
        );
        assert_ne!(
            a,
            EventId::emitted("payments.charge", cause, "PaymentDeclined", 0)
        );
    }

    #[test]
    fn short_forms_of_ids_made_together_differ() {
        let (a, b) = (EventId::new_random(), EventId::new_random());
        assert_ne!(a.short(), b.short());
        assert_eq!(a.short().len(), 8);
        assert!(a.to_string().ends_with(&a.short()));
    }

    #[test]
    fn random_ids_are_v7() {
        assert_eq!(EventId::new_random().as_uuid().get_version_num(), 7);
    }
}
