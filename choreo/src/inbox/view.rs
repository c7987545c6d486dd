//! The inbox as the `choreo` tool reads and edits it: whether a handler
//! has handled an event, and forgetting that it did (`replay --rerun`).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::event::id::EventId;
use crate::nats::{Source, source};
use crate::topology::inbox_group::{DEFAULT_INBOX_GROUPS, Group, inbox_group_key};
use crate::topology::{inbox_bucket, inbox_key, recorded_groups};

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

    /// Forgets that `handler` handled `events`, so their next deliveries
    /// run it again; returns how many records it removed.
    pub(crate) async fn forget(&self, handler: &str, events: &[EventId]) -> Result<usize, Source> {
        let mut by_group: BTreeMap<String, Vec<EventId>> = BTreeMap::new();
        for e in events {
            by_group
                .entry(inbox_group_key(handler, *e, self.groups))
                .or_default()
                .push(*e);
        }
        let mut removed = 0;
        for (group, ids) in by_group {
            removed += self.forget_in(&group, &ids).await?;
        }
        for e in events {
            let key = inbox_key(handler, *e);
            if let Ok(Some(v)) = self.store.get(&key).await
                && v.starts_with(b"done")
            {
                self.store.delete(&key).await.map_err(source)?;
                removed += 1;
            }
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
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(source(e)),
            }
        }
        Err(crate::nats::message(format!(
            "group {group} kept changing while records were removed"
        )))
    }
}
