//! How an inbox groups its records: the events a handler has handled are
//! kept many to a key, so the server holds one subject-index entry (about
//! 350 bytes of its memory) per group instead of one per event.
//!
//! A handler's record of event `id` lives in the key
//! `<handler>.g.<n>` ([`inbox_group_key`]), where `n` is the FNV-1a hash of
//! the id's 16 bytes modulo the service's group count (recorded in the
//! bucket stream's metadata under [`GROUPS_METADATA`], so every instance and
//! the `choreo` tool use the same). The value is a [`Group`]: version byte `1`, then 24 bytes per
//! event — its id, and the unix time in ms it was recorded (big-endian).
//! Each write drops the entries older than the bucket's horizon, and a
//! group not written for a horizon expires with the bucket's `max_age`, so
//! what the server holds is bounded by the group count, not by the events.

use crate::event::id::EventId;

/// Groups per handler unless the service says otherwise
/// (`Service::inbox_groups`): at most 65,536 keys per handler on the server
/// (about 23 MB of its memory, from the measured ~350 bytes per key),
/// however many events the horizon holds.
pub const DEFAULT_INBOX_GROUPS: u32 = 65_536;

/// The most groups a service may ask for.
pub const MAX_INBOX_GROUPS: u32 = 1 << 24;

/// The bucket stream's metadata entry that records its group count.
pub(crate) const GROUPS_METADATA: &str = "choreo_inbox_groups";

/// The group count a bucket's stream records, if it records a valid one.
pub(crate) fn recorded_groups(config: &async_nats::jetstream::stream::Config) -> Option<u32> {
    config
        .metadata
        .get(GROUPS_METADATA)
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=MAX_INBOX_GROUPS).contains(n))
}

/// Which of `groups` groups holds `event`'s records.
pub(crate) fn inbox_group(event: EventId, groups: u32) -> u32 {
    // FNV-1a, 64 bits: fixed for all time (a std hasher is not), and it
    // spreads v7 ids, whose first bytes are a clock, over every group.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in event.as_uuid().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(groups.max(1))) as u32
}

/// The key of the group that holds `handler`'s record of `event`.
pub fn inbox_group_key(handler: &str, event: EventId, groups: u32) -> String {
    format!("{handler}.g.{:x}", inbox_group(event, groups))
}

/// The decoded value of one group key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Group {
    entries: Vec<([u8; 16], u64)>,
}

const VERSION: u8 = 1;
const ENTRY: usize = 24;

impl Group {
    /// Decodes a group value; an empty, foreign or truncated value yields
    /// the entries it holds whole (none for a value of another version).
    pub(crate) fn parse(value: &[u8]) -> Self {
        let Some((&VERSION, body)) = value.split_first() else {
            return Self::default();
        };
        let entries = body
            .chunks_exact(ENTRY)
            .map(|c| {
                let mut id = [0; 16];
                id.copy_from_slice(&c[..16]);
                let mut ms = [0; 8];
                ms.copy_from_slice(&c[16..]);
                (id, u64::from_be_bytes(ms))
            })
            .collect();
        Self { entries }
    }

    /// The value to write.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.entries.len() * ENTRY);
        out.push(VERSION);
        for (id, ms) in &self.entries {
            out.extend_from_slice(id);
            out.extend_from_slice(&ms.to_be_bytes());
        }
        out
    }

    /// When `event` was recorded (unix ms), if the group value `value`
    /// holds it: read in place, without decoding the group (a look-up's
    /// path).
    pub(crate) fn recorded_in(value: &[u8], event: EventId) -> Option<u64> {
        let (&VERSION, body) = value.split_first()? else {
            return None;
        };
        let id = event.as_uuid();
        let id = id.as_bytes();
        body.chunks_exact(ENTRY)
            .find(|c| &c[..16] == id)
            .map(|c| u64::from_be_bytes(c[16..].try_into().unwrap_or_default()))
    }

    /// When `event` was recorded (unix ms), if it is in the group.
    pub(crate) fn recorded(&self, event: EventId) -> Option<u64> {
        let id = *event.as_uuid().as_bytes();
        self.entries
            .iter()
            .find(|(e, _)| *e == id)
            .map(|(_, ms)| *ms)
    }

    /// Records `event` at `now_ms`, dropping the entries recorded before
    /// `keep_from_ms`; false if it was already recorded.
    pub(crate) fn insert(&mut self, event: EventId, now_ms: u64, keep_from_ms: u64) -> bool {
        if self.recorded(event).is_some() {
            return false;
        }
        self.entries.retain(|(_, ms)| *ms >= keep_from_ms);
        self.entries.push((*event.as_uuid().as_bytes(), now_ms));
        true
    }

    /// Forgets `event`; false if it was not recorded.
    pub(crate) fn remove(&mut self, event: EventId) -> bool {
        let id = *event.as_uuid().as_bytes();
        let before = self.entries.len();
        self.entries.retain(|(e, _)| *e != id);
        self.entries.len() != before
    }

    /// How many events it records.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::event::id::EventId;

    use super::{Group, inbox_group, inbox_group_key};

    fn id(n: u128) -> EventId {
        EventId::from(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn groups_are_fixed_and_spread() {
        // The hash is part of the layout: it must never change.
        assert_eq!(inbox_group(id(0), 65_536), 0x6465);
        let mut seen = std::collections::HashSet::new();
        for n in 0..1000u128 {
            // v7-like ids: the clock in the first bytes barely moves.
            seen.insert(inbox_group(id((0x0190_0000_0000 << 80) | n), 64));
        }
        assert_eq!(seen.len(), 64, "1000 ids fill every one of 64 groups");
        assert_eq!(inbox_group_key("ship", id(0), 65_536), "ship.g.6465");
    }

    #[test]
    fn a_group_round_trips_and_answers_exactly() {
        let mut g = Group::default();
        assert!(g.insert(id(1), 1000, 0));
        assert!(g.insert(id(2), 2000, 0));
        assert!(!g.insert(id(1), 3000, 0), "recorded once");
        let back = Group::parse(&g.encode());
        assert_eq!(back, g);
        assert_eq!(back.recorded(id(1)), Some(1000));
        assert_eq!(back.recorded(id(3)), None);
        // Read in place, the same answers.
        assert_eq!(Group::recorded_in(&g.encode(), id(2)), Some(2000));
        assert_eq!(Group::recorded_in(&g.encode(), id(3)), None);
        assert_eq!(Group::recorded_in(b"done 17", id(1)), None);
        assert_eq!(g.encode().len(), 1 + 2 * 24);
    }

    #[test]
    fn writes_drop_what_the_horizon_has_passed() {
        let mut g = Group::default();
        g.insert(id(1), 1000, 0);
        g.insert(id(2), 5000, 0);
        g.insert(id(3), 9000, 4000);
        assert_eq!(g.len(), 2);
        assert_eq!(g.recorded(id(1)), None);
        assert!(g.remove(id(2)));
        assert!(!g.remove(id(2)));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn foreign_values_hold_nothing() {
        assert_eq!(Group::parse(b"").len(), 0);
        assert_eq!(Group::parse(b"done 17").len(), 0);
        let mut v = Group::default();
        v.insert(id(1), 1, 0);
        let mut bytes = v.encode();
        bytes.push(7);
        assert_eq!(Group::parse(&bytes).len(), 1, "a torn tail is ignored");
    }
}
