//! The inbox as the `choreo` tool reads and edits it: whether a handler
//! has handled an event, and forgetting that it did (`replay --rerun`).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::event::id::EventId;
use crate::nats::{Source, moved_on, source};
use crate::topology::inbox_group::{DEFAULT_INBOX_GROUPS, Group, inbox_group_key};
use crate::topology::{inbox_bucket, inbox_key, recorded_groups};

/// How many groups the tool reads or rewrites at once.
const CONCURRENT: usize = 64;

/// A service's inbox bucket, with its group count.
#[derive(Debug, Clone)]
pub(crate) struct View {
    store: kv::Store,
    groups: u32,
}

impl View {
    /// The service's inbox, if it has one.
    pub(crate) async fn open(js: &jetstream::Context, service: &str) -> Option<Self> {
        let bucket = inbox_bucket(service);
        let store = js.get_key_value(&bucket).await.ok()?;
        let groups = match js.get_stream(format!("KV_{bucket}")).await {
            Ok(s) => recorded_groups(&s.cached_info().config).unwrap_or(DEFAULT_INBOX_GROUPS),
            Err(_) => DEFAULT_INBOX_GROUPS,
        };
        Some(Self { store, groups })
    }

    /// When `handler` recorded `event` as handled (unix ms), if it did: from
    /// the event's group, or a record from before groups under its own key.
    pub(crate) async fn handled_at(&self, handler: &str, event: EventId) -> Option<u64> {
        let group = inbox_group_key(handler, event, self.groups);
        if let Ok(Some(v)) = self.store.get(&group).await
            && let Some(ms) = Group::recorded_in(&v, event)
        {
            return Some(ms);
        }
        let old = self.store.get(inbox_key(handler, event)).await.ok()??;
        std::str::from_utf8(&old)
            .ok()?
            .strip_prefix("done ")?
            .trim()
            .parse()
            .ok()
    }

    /// What `handler`'s claim key for `event` notes, if it says on which
    /// attempt: a handler running it, or an attempt that failed and waits
    /// for its retry.
    pub(crate) async fn note(&self, handler: &str, event: EventId) -> Option<super::Note> {
        let value = self.store.get(inbox_key(handler, event)).await.ok()??;
        super::note(&value)
    }

    /// How many events `handler`'s groups record: every group's value, read
    /// with one ordered consumer (a full scan: for tests and benchmarks).
    pub(crate) async fn records(&self, handler: &str) -> Result<u64, Source> {
        use futures::StreamExt;
        let consumer = self
            .store
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{}{handler}.g.>", self.store.prefix),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(source)?;
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.map_err(source)?;
        let mut records = 0;
        for _ in 0..pending {
            let Some(m) = messages.next().await else {
                break;
            };
            let m = m.map_err(source)?;
            records += Group::parse(&m.payload).len() as u64;
        }
        Ok(records)
    }

    /// Which of `events` `handler` recorded as handled: each group read
    /// once, up to [`CONCURRENT`] at a time, and the records from before
    /// groups only where such keys exist.
    pub(crate) async fn handled(
        &self,
        handler: &str,
        events: &[EventId],
    ) -> Result<Vec<EventId>, Source> {
        use futures::{StreamExt, TryStreamExt};
        let by_group = self.by_group(handler, events);
        let mut handled: Vec<EventId> = futures::stream::iter(by_group)
            .map(|(group, ids)| async move {
                let value = self.store.get(&group).await.map_err(source)?;
                Ok::<_, Source>(match value {
                    Some(v) => ids
                        .into_iter()
                        .filter(|id| Group::recorded_in(&v, *id).is_some())
                        .collect(),
                    None => Vec::new(),
                })
            })
            .buffer_unordered(CONCURRENT)
            .try_concat()
            .await?;
        handled.extend(self.legacy(handler, events).await?);
        Ok(handled)
    }

    /// The ids of `events` in `handler`'s groups.
    fn by_group(&self, handler: &str, events: &[EventId]) -> BTreeMap<String, Vec<EventId>> {
        let mut by_group: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
        for e in events {
            by_group
                .entry(inbox_group_key(handler, *e, self.groups))
                .or_default()
                .push(*e);
        }
        by_group
    }

    /// Which of `events` have a record from before groups (`done <ms>`
    /// under the event's own key): one stream info lists the keys of that
    /// shape (claims share it), and only those are read.
    async fn legacy(&self, handler: &str, events: &[EventId]) -> Result<Vec<EventId>, Source> {
        use futures::TryStreamExt;
        let prefix = format!("{}{handler}.", self.store.prefix);
        let mut info = self
            .store
            .stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(source)?;
        let wanted: std::collections::HashSet<EventId> = events.iter().copied().collect();
        let mut found = Vec::new();
        while let Some((subject, _)) = info.try_next().await.map_err(source)? {
            if let Some(id) = subject
                .strip_prefix(&prefix)
                .and_then(|id| id.parse::<EventId>().ok())
                .filter(|id| wanted.contains(id))
                && let Some(v) = self
                    .store
                    .get(inbox_key(handler, id))
                    .await
                    .map_err(source)?
                && v.starts_with(b"done")
            {
                found.push(id);
            }
        }
        Ok(found)
    }

    /// Forgets that `handler` handled `events`, so their next deliveries
    /// run it again; returns how many records it removed. Groups are
    /// rewritten up to [`CONCURRENT`] at a time.
    pub(crate) async fn forget(&self, handler: &str, events: &[EventId]) -> Result<usize, Source> {
        use futures::{StreamExt, TryStreamExt};
        let by_group = self.by_group(handler, events);
        let mut removed: usize = futures::stream::iter(by_group)
            .map(|(group, ids)| async move { self.forget_in(&group, &ids).await })
            .buffer_unordered(CONCURRENT)
            .try_fold(0, |sum, n| async move { Ok(sum + n) })
            .await?;
        for id in self.legacy(handler, events).await? {
            self.store
                .delete(inbox_key(handler, id))
                .await
                .map_err(source)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes `ids` from one group with a compare-and-set, re-read on a
    /// conflict (a running instance adding a record in between).
    async fn forget_in(&self, group: &str, ids: &[EventId]) -> Result<usize, Source> {
        for _ in 0..32 {
            let Some(entry) = self.store.entry(group).await.map_err(source)? else {
                return Ok(0);
            };
            if !matches!(entry.operation, kv::Operation::Put) {
                return Ok(0);
            }
            let mut records = Group::parse(&entry.value);
            let removed = ids.iter().filter(|id| records.remove(**id)).count();
            if removed == 0 {
                return Ok(0);
            }
            match self
                .store
                .update(group, Bytes::from(records.encode()), entry.revision)
                .await
            {
                Ok(_) => return Ok(removed),
                Err(e) if moved_on(&e) => {}
                Err(e) => return Err(source(e)),
            }
        }
        Err(crate::nats::message(format!(
            "group {group} kept changing while records were removed"
        )))
    }
}
