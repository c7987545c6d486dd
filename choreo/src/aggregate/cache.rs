//! The states this process loaded last, so the next decision on a hot
//! aggregate reads only the events after them instead of its history.
//!
//! An entry is a state, its version and the caused events of the last
//! [`RECENT`] it folded, indexed by their causation ids, so a redelivered
//! event still finds the decision its first delivery appended. The caused
//! events stay in the cache: a decision copies out the state alone, looks
//! its cause up, and hands back only the events it read or appended, so
//! its cost does not grow with the instance's traffic. Entries leave
//! oldest first past [`Aggregates::cache`](super::Aggregates::cache)'s
//! capacity.

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use super::Aggregate;
use super::store::Appended;
use crate::event::EventId;

/// How long a caused event stays among an entry's recent events: longer
/// than an event normally waits to be delivered again.
pub(crate) const RECENT: Duration = Duration::from_secs(3600);

/// The default number of states kept.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// A caused event folded into a state.
#[derive(Clone, Debug)]
pub(crate) struct Recent {
    pub(crate) causation: EventId,
    pub(crate) source: String,
    pub(crate) appended: Appended,
    pub(crate) stored_at: OffsetDateTime,
}

/// One cached state, as a decision or a load copies it out.
#[derive(Clone)]
pub(crate) struct Entry<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
    pub(crate) events: u64,
    /// The last decision on it met a conflict: others write to it, so the
    /// next one reads before deciding.
    pub(crate) contended: bool,
}

/// The caused events an instance folded lately, by causation id.
#[derive(Default)]
struct Recents {
    by_cause: HashMap<EventId, Vec<(String, Appended)>>,
    /// When each cause's events were stored, oldest first.
    order: VecDeque<(OffsetDateTime, EventId)>,
}

impl Recents {
    fn push(&mut self, r: Recent) {
        let events = self.by_cause.entry(r.causation).or_default();
        if events.is_empty() {
            self.order.push_back((r.stored_at, r.causation));
        }
        events.push((r.source, r.appended));
    }

    /// Forgets the causes whose events were stored before `since`.
    fn prune(&mut self, since: OffsetDateTime) {
        while let Some((at, cause)) = self.order.front().copied() {
            if at > since {
                break;
            }
            self.order.pop_front();
            self.by_cause.remove(&cause);
        }
    }

    fn find(&self, cause: EventId, source: &str) -> Vec<Appended> {
        self.by_cause
            .get(&cause)
            .into_iter()
            .flatten()
            .filter(|(s, _)| s == source)
            .map(|(_, a)| a.clone())
            .collect()
    }
}

/// What the cache holds per instance.
struct Stored {
    entry: Box<dyn Any + Send + Sync>,
    version: u64,
    recents: Recents,
}

type Key = (TypeId, String);

/// By aggregate type, then id (so a lookup by `&str` allocates nothing).
type ByType<V> = HashMap<TypeId, HashMap<String, V>>;

#[derive(Default)]
struct Inner {
    map: ByType<Stored>,
    order: VecDeque<Key>,
}

/// One lock per aggregate instance being decided on in this process:
/// decisions on one instance from one process take turns instead of
/// conflicting with each other (conflicts then come only from other
/// processes). An instance's lock is dropped when nobody waits for it.
#[derive(Clone, Default)]
pub(crate) struct Turns {
    inner: Arc<Mutex<ByType<Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for Turns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turns").finish_non_exhaustive()
    }
}

/// A held turn; releases it, and forgets the instance's lock when nobody
/// else holds or waits for it, on drop.
pub(crate) struct Turn {
    turns: Turns,
    key: Key,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for the turn of instance `id` of the aggregate type `ty`.
    pub(crate) async fn take(&self, ty: TypeId, id: &str) -> Turn {
        let key = (ty, id.to_owned());
        let lock = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ty)
            .or_default()
            .entry(key.1.clone())
            .or_default()
            .clone();
        Turn {
            turns: self.clone(),
            key,
            lock: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.lock.take());
        let mut map = self.turns.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (ty, id) = &self.key;
        if let Some(m) = map.get_mut(ty)
            // The map's own reference is the only one left: nobody waits.
            && m.get(id).is_some_and(|l| Arc::strong_count(l) == 1)
        {
            m.remove(id);
        }
    }
}

/// The cache, shared by the clones of one `Aggregates`.
#[derive(Clone)]
pub(crate) struct Cache {
    inner: Arc<Mutex<Inner>>,
    capacity: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of instance `id`'s entry, and the events it folded that
    /// `cause` (a handled event, from service `source`) caused.
    pub(crate) fn get<A: Aggregate>(
        &self,
        id: &str,
        cause: Option<(EventId, &str)>,
    ) -> Option<(Entry<A>, Vec<Appended>)> {
        if self.capacity == 0 {
            return None;
        }
        let inner = self.lock();
        let stored = inner.map.get(&TypeId::of::<A>())?.get(id)?;
        let entry = stored.entry.downcast_ref::<Entry<A>>()?.clone();
        let earlier = cause.map_or_else(Vec::new, |(c, s)| stored.recents.find(c, s));
        Some((entry, earlier))
    }

    /// Keeps `entry` for instance `id`, with `recent`, the caused events
    /// folded since the entry it started from, unless a newer one is kept
    /// already. Caused events older than [`RECENT`] are forgotten.
    pub(crate) fn put<A: Aggregate>(&self, id: &str, entry: Entry<A>, recent: Vec<Recent>) {
        if self.capacity == 0 {
            return;
        }
        let since = OffsetDateTime::now_utc() - RECENT;
        let ty = TypeId::of::<A>();
        let mut inner = self.lock();
        let version = entry.version;
        match inner.map.get_mut(&ty).and_then(|m| m.get_mut(id)) {
            Some(stored) if stored.version > version => {}
            Some(stored) => {
                for r in recent {
                    // Those a newer entry folded are there already.
                    if r.appended.sequence > stored.version {
                        stored.recents.push(r);
                    }
                }
                stored.recents.prune(since);
                stored.entry = Box::new(entry);
                stored.version = version;
            }
            None => {
                let mut recents = Recents::default();
                for r in recent {
                    recents.push(r);
                }
                recents.prune(since);
                inner.map.entry(ty).or_default().insert(
                    id.to_owned(),
                    Stored {
                        entry: Box::new(entry),
                        version,
                        recents,
                    },
                );
                inner.order.push_back((ty, id.to_owned()));
                while inner.order.len() > self.capacity {
                    if let Some((ty, old)) = inner.order.pop_front()
                        && let Some(m) = inner.map.get_mut(&ty)
                    {
                        m.remove(&old);
                    }
                }
            }
        }
    }
}
