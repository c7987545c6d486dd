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

/// What the cache holds per instance of `A`: the entry inline (a lookup
/// reads one bucket, not a bucket and a box), the recent caused events
/// boxed, since most instances have none.
struct Stored<A> {
    entry: Entry<A>,
    recents: Option<Box<Recents>>,
}

/// The entries of one aggregate type, by id (a lookup by `&str` allocates
/// nothing).
struct Entries<A> {
    map: HashMap<String, Stored<A>>,
}

/// [`Entries`] of any aggregate type.
trait AnyEntries: Any + Send + Sync {
    fn remove(&mut self, id: &str);
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<A: Aggregate> AnyEntries for Entries<A> {
    fn remove(&mut self, id: &str) {
        self.map.remove(id);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

type Key = (TypeId, String);

/// The turns' locks, by aggregate type, then id.
type TurnLocks = HashMap<TypeId, HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>;

#[derive(Default)]
struct Inner {
    by_type: HashMap<TypeId, Box<dyn AnyEntries>>,
    order: VecDeque<Key>,
}

impl Inner {
    fn entries<A: Aggregate>(&self) -> Option<&Entries<A>> {
        self.by_type
            .get(&TypeId::of::<A>())?
            .as_any()
            .downcast_ref()
    }

    fn entries_mut<A: Aggregate>(&mut self) -> &mut Entries<A> {
        self.by_type
            .entry(TypeId::of::<A>())
            .or_insert_with(|| {
                Box::new(Entries::<A> {
                    map: HashMap::new(),
                })
            })
            .as_any_mut()
            .downcast_mut()
            .expect("the entries kept under a type's id are of that type")
    }
}

/// One lock per aggregate instance being decided on in this process:
/// decisions on one instance from one process take turns instead of
/// conflicting with each other (conflicts then come only from other
/// processes). An instance's lock is dropped when nobody waits for it.
#[derive(Clone, Default)]
pub(crate) struct Turns {
    inner: Arc<Mutex<TurnLocks>>,
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
    key: (TypeId, Arc<str>),
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for the turn of instance `id` of the aggregate type `ty`.
    pub(crate) async fn take(&self, ty: TypeId, id: &str) -> Turn {
        // One copy of the id, shared by the map's key and the turn.
        let id: Arc<str> = Arc::from(id);
        let lock = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ty)
            .or_default()
            .entry(id.clone())
            .or_default()
            .clone();
        let key = (ty, id);
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
        let stored = inner.entries::<A>()?.map.get(id)?;
        let earlier = match (cause, &stored.recents) {
            (Some((c, s)), Some(recents)) => recents.find(c, s),
            _ => Vec::new(),
        };
        Some((stored.entry.clone(), earlier))
    }

    /// Keeps `entry` for instance `id`, with `recent`, the caused events
    /// folded since the entry it started from, unless a newer one is kept
    /// already. Caused events older than [`RECENT`] are forgotten.
    pub(crate) fn put<A: Aggregate>(&self, id: &str, entry: Entry<A>, recent: Vec<Recent>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        let version = entry.version;
        let entries = inner.entries_mut::<A>();
        match entries.map.get_mut(id) {
            Some(stored) if stored.entry.version > version => {}
            Some(stored) => {
                let kept = stored.entry.version;
                for r in recent {
                    // Those a newer entry folded are there already.
                    if r.appended.sequence > kept {
                        stored.recents.get_or_insert_default().push(r);
                    }
                }
                if let Some(recents) = &mut stored.recents {
                    recents.prune(OffsetDateTime::now_utc() - RECENT);
                    if recents.order.is_empty() {
                        stored.recents = None;
                    }
                }
                stored.entry = entry;
            }
            None => {
                let mut recents = None;
                for r in recent {
                    recents.get_or_insert_with(Box::<Recents>::default).push(r);
                }
                if let Some(r) = &mut recents {
                    r.prune(OffsetDateTime::now_utc() - RECENT);
                }
                entries.map.insert(id.to_owned(), Stored { entry, recents });
                inner.order.push_back((TypeId::of::<A>(), id.to_owned()));
                while inner.order.len() > self.capacity {
                    if let Some((ty, old)) = inner.order.pop_front()
                        && let Some(m) = inner.by_type.get_mut(&ty)
                    {
                        m.remove(&old);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::{Cache, Entry, Recent};
    use crate::aggregate::store::Appended;
    use crate::aggregate::{Aggregate, AggregateEvent, EventVisitor};
    use crate::event::{DecodeError, EventId, EventType};

    /// An aggregate with no events: the cache never folds, it keeps.
    enum Never {}

    impl AggregateEvent for Never {
        const TYPES: &'static [EventType] = &[];
        fn decode(_: &str, _: u32, _: &[u8]) -> Option<Result<Self, DecodeError>> {
            None
        }
        fn visit<V: EventVisitor>(&self, _: &mut V) -> V::Output {
            match *self {}
        }
    }

    /// A counter; `K` makes each a type of its own (another aggregate).
    #[derive(Default, Clone, Debug, PartialEq)]
    struct Count<const K: u8>(u64);

    impl<const K: u8> Aggregate for Count<K> {
        const NAME: &'static str = "Count";
        type Event = Never;
        fn filter(id: &str) -> String {
            format!("count{K}.{id}.*")
        }
        fn apply(&mut self, event: &Never) {
            match *event {}
        }
    }

    fn entry<A>(state: A, version: u64) -> Entry<A> {
        Entry {
            state,
            version,
            events: version,
            contended: false,
        }
    }

    fn state<A: Aggregate>(cache: &Cache, id: &str) -> Option<A> {
        cache.get::<A>(id, None).map(|(e, _)| e.state)
    }

    #[test]
    fn keeps_the_newest_state_per_type_and_forgets_the_oldest_past_its_capacity() {
        let cache = Cache::new(2);
        cache.put("a", entry(Count::<0>(1), 10), Vec::new());
        // An older state (a slower decision's) does not replace a newer one.
        cache.put("a", entry(Count::<0>(0), 5), Vec::new());
        assert_eq!(state::<Count<0>>(&cache, "a"), Some(Count::<0>(1)));
        cache.put("a", entry(Count::<0>(2), 11), Vec::new());
        assert_eq!(state::<Count<0>>(&cache, "a"), Some(Count::<0>(2)));
        // The same id of another aggregate is another instance.
        cache.put("a", entry(Count::<1>(7), 3), Vec::new());
        assert_eq!(state::<Count<1>>(&cache, "a"), Some(Count::<1>(7)));
        assert_eq!(state::<Count<0>>(&cache, "a"), Some(Count::<0>(2)));
        // A third instance: the first one kept leaves.
        cache.put("b", entry(Count::<0>(9), 12), Vec::new());
        assert_eq!(state::<Count<0>>(&cache, "a"), None);
        assert_eq!(state::<Count<1>>(&cache, "a"), Some(Count::<1>(7)));
        assert_eq!(state::<Count<0>>(&cache, "b"), Some(Count::<0>(9)));
        // Capacity 0 keeps nothing.
        let none = Cache::new(0);
        none.put("a", entry(Count::<0>(1), 1), Vec::new());
        assert_eq!(state::<Count<0>>(&none, "a"), None);
    }

    #[test]
    fn finds_what_a_cause_appended_among_the_recent_events() {
        let cache = Cache::new(10);
        let (cause, other) = (EventId::new_random(), EventId::new_random());
        let appended = Appended {
            event_id: EventId::new_random(),
            subject: "count.a.added".into(),
            sequence: 4,
        };
        let recent = Recent {
            causation: cause,
            source: "svc".into(),
            appended: appended.clone(),
            stored_at: OffsetDateTime::now_utc(),
        };
        cache.put("a", entry(Count::<0>(1), 4), vec![recent]);
        let found = |c, s| cache.get::<Count<0>>("a", Some((c, s))).unwrap().1;
        assert_eq!(found(cause, "svc"), vec![appended.clone()]);
        assert!(found(cause, "another-service").is_empty());
        assert!(found(other, "svc").is_empty());
        // A newer state with no caused events keeps the recent ones.
        cache.put("a", entry(Count::<0>(2), 5), Vec::new());
        assert_eq!(found(cause, "svc"), vec![appended]);
        // Those stored longer ago than RECENT are forgotten (they come in
        // the order they were stored, so the oldest are at the front).
        let old = Recent {
            causation: other,
            source: "svc".into(),
            appended: Appended {
                event_id: EventId::new_random(),
                subject: "count.a.added".into(),
                sequence: 6,
            },
            stored_at: OffsetDateTime::now_utc() - super::RECENT * 2,
        };
        cache.put("b", entry(Count::<0>(3), 6), vec![old]);
        assert!(
            cache
                .get::<Count<0>>("b", Some((other, "svc")))
                .unwrap()
                .1
                .is_empty()
        );
    }
}
