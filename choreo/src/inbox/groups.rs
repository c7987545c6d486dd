//! Adding a record to its group: a compare-and-set on the group's value,
//! started from the value this instance last saw of it (read with the
//! event's look-up, or written by its last record) and re-read from the
//! stream's leader after a conflict.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

use super::{Inbox, InboxError, Raw, now_ms};
use crate::nats::jitter;
use crate::topology::inbox_group::Group;

/// How many groups' values an instance keeps in memory (each is at most a
/// few KB): enough for every event in flight.
const KNOWN_GROUPS: usize = 4096;

/// How many times adding a record re-reads its group after a conflict (an
/// instance writing another record of the same group in between) before
/// the event is left to come back.
const GROUP_WRITE_TRIES: u32 = 32;

/// The pause before re-reading a group after its second conflict in a
/// row, doubled after each further one up to [`MOST_CONFLICT_PAUSE`]
/// (jittered). On a cluster, a write refused because another write of the
/// group is still being replicated would otherwise re-read the value it
/// already has and be refused again, spending its tries in a millisecond.
const CONFLICT_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause between two tries of a record's write.
const MOST_CONFLICT_PAUSE: Duration = Duration::from_millis(50);

impl Inbox {
    /// Keeps `raw` as the newest known value of a group, unless a newer
    /// one is known.
    pub(super) fn remember(&self, group_key: &str, raw: &Raw) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= KNOWN_GROUPS && !known.contains_key(group_key) {
            known.clear();
        }
        let newer = known.get(group_key).is_none_or(|(r, _)| *r < raw.revision);
        if newer {
            let value = if raw.deleted {
                Bytes::new()
            } else {
                raw.value.clone()
            };
            known.insert(group_key.to_owned(), (raw.revision, value));
        }
    }

    /// Drops what is known of a group (its write just conflicted).
    pub(super) fn forget(&self, group_key: &str) {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(group_key);
    }

    /// Reads a key from the stream's leader (never a follower that may lag
    /// behind a write), for the base of a compare-and-set after a conflict.
    async fn leader_entry(&self, key: &str) -> Result<Option<Raw>, InboxError> {
        use jetstream::stream::LastRawMessageErrorKind as K;
        match self
            .kv
            .stream
            .get_last_raw_message_by_subject(&format!("{}{key}", self.key_prefix))
            .await
        {
            Ok(m) => Ok(Some(Raw {
                revision: m.sequence,
                deleted: m.headers.get("KV-Operation").is_some(),
                value: m.payload,
            })),
            Err(e) if e.kind() == K::NoMessageFound => Ok(None),
            Err(e) => Err(self.fail("cannot read", e)),
        }
    }

    /// Records the event whose claim key is `key` as handled, in its group.
    /// If another delivery recorded it meanwhile, that is enough. Returns
    /// how many writes conflicted before one went through.
    pub(crate) async fn done(&self, key: &str) -> Result<u32, InboxError> {
        self.metrics.records.increment(1);
        let Some((group, id)) = self.group_of(key) else {
            return Err(self.err(format!("{key} names no event id")));
        };
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&group)
            .cloned();
        for tries in 0..GROUP_WRITE_TRIES {
            if tries > 1 {
                let pause = CONFLICT_PAUSE.saturating_mul(1 << (tries - 2).min(6));
                tokio::time::sleep(jitter(pause.min(MOST_CONFLICT_PAUSE))).await;
            }
            let (revision, value) = match known.take() {
                Some(k) => k,
                // Boxed: a read after a conflict is rare, and its request's
                // future made every record's 2.2 KB instead of 1.4.
                None => match Box::pin(self.leader_entry(&group)).await? {
                    Some(r) if !r.deleted => (r.revision, r.value),
                    Some(r) => (r.revision, Bytes::new()),
                    None => (0, Bytes::new()),
                },
            };
            let mut records = Group::parse(&value);
            let now = now_ms();
            if !records.insert(id, now, now.saturating_sub(self.horizon_ms)) {
                tracing::info!(
                    key,
                    "another delivery recorded this event while the handler ran"
                );
                return Ok(tries);
            }
            let value = Bytes::from(records.encode());
            match self.write_at(&group, value.clone(), revision, None).await {
                Ok(revision) => {
                    self.remember(
                        &group,
                        &Raw {
                            revision,
                            deleted: false,
                            value,
                        },
                    );
                    return Ok(tries);
                }
                Err((true, _)) => self.forget(&group),
                Err((false, e)) => return Err(e),
            }
        }
        Err(self.err(format!(
            "group {group} kept changing while the record was written ({GROUP_WRITE_TRIES} tries)"
        )))
    }
}
