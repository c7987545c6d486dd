//! The states this process loaded last, so the next decision on a hot
//! aggregate reads only the events after them instead of its history.
//!
//! An entry is a state, its version and the caused events of the last
//! [`RECENT`] it folded (their causation ids), so a redelivered event still
//! finds the decision its first delivery appended. Entries leave oldest
//! first past [`Aggregates::cache`](super::Aggregates::cache)'s capacity.

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

/// One cached state.
#[derive(Clone)]
pub(crate) struct Entry<A> {
    pub(crate) state: A,
    pub(crate) version: u64,
    pub(crate) events: u64,
    pub(crate) recent: Vec<Recent>,
    /// The last decision on it met a conflict: others write to it, so the
    /// next one reads before deciding.
    pub(crate) contended: bool,
}

type Key = (TypeId, String);

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Box<dyn Any + Send + Sync>>,
    order: VecDeque<Key>,
}

/// One lock per aggregate instance being decided on in this process:
/// decisions on one instance from one process take turns instead of
/// conflicting with each other (conflicts then come only from other
/// processes). An instance's lock is dropped when nobody waits for it.
#[derive(Clone, Default)]
pub(crate) struct Turns {
    inner: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>>,
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
            .entry(key.clone())
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
        // The map's own reference is the only one left: nobody waits.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
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

    /// A copy of instance `id`'s entry.
    pub(crate) fn get<A: Aggregate>(&self, id: &str) -> Option<Entry<A>> {
        if self.capacity == 0 {
            return None;
        }
        self.lock()
            .map
            .get(&(TypeId::of::<A>(), id.to_owned()))
            .and_then(|e| e.downcast_ref::<Entry<A>>())
            .cloned()
    }

    /// Keeps `entry` for instance `id`, its recent events pruned, unless a
    /// newer one is kept already.
    pub(crate) fn put<A: Aggregate>(&self, id: &str, mut entry: Entry<A>) {
        if self.capacity == 0 {
            return;
        }
        let since = OffsetDateTime::now_utc() - RECENT;
        entry.recent.retain(|r| r.stored_at > since);
        let key = (TypeId::of::<A>(), id.to_owned());
        let mut inner = self.lock();
        let newer = inner
            .map
            .get(&key)
            .and_then(|e| e.downcast_ref::<Entry<A>>())
            .is_some_and(|e| e.version > entry.version);
        if newer {
            return;
        }
        if inner.map.insert(key.clone(), Box::new(entry)).is_none() {
            inner.order.push_back(key);
            while inner.order.len() > self.capacity {
                if let Some(old) = inner.order.pop_front() {
                    inner.map.remove(&old);
                }
            }
        }
    }
}
