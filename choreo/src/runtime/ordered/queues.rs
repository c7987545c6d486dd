//! The keys' queues of one partition: the events that arrived at the
//! holder, by key, in stream order; only each key's head runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinSet;

use crate::runtime::requests::Slot;
use crate::runtime::{Runtime, Seen, Settled, pull};

/// One event of a key's queue.
pub(super) enum Entry {
    /// Arrived here, waiting for the events before it. Boxed: a key's
    /// queue is a `BTreeMap`, whose first node holds room for 11 entries,
    /// so an unboxed `Waiting` (about 490 bytes) made every new key's
    /// queue a 5.5 KB allocation, most of them for one event.
    Here(Box<Waiting>),
    /// Running.
    Running,
    /// Not here but still in the work queue: a retry, or an event the last
    /// holder had not acknowledged. Its key waits for it.
    Expected(Instant),
}

pub(super) use tokio::time::Instant;

/// An event here, waiting for the events of its key before it.
pub(super) struct Waiting {
    pub(super) msg: jetstream::Message,
    pub(super) slot: Slot,
    /// Its inbox record, read with its chunk on arrival.
    pub(super) seen: Seen,
    pub(super) arrived: Instant,
    /// Its last sign of life to the server.
    pub(super) alive: Instant,
}

/// How long an inbox record read on arrival is trusted: an event that
/// waited longer behind its key reads its record again when it runs
/// (another instance may have handled a copy of it meanwhile).
const SEEN_FOR: Duration = Duration::from_millis(500);

/// The keys' queues of one partition.
#[derive(Default)]
pub(super) struct Queues {
    /// Whether this instance holds the partition's pin: if not, a retry
    /// goes to the next holder, and its key's queue is dropped here.
    pub(super) holding: bool,
    pub(super) keys: HashMap<String, BTreeMap<u64, Entry>>,
    /// Keys whose head may be ready to run.
    pub(super) touched: HashSet<String>,
    /// What a take-over found the last holder left, put in the queues
    /// after the chunk that brought the pin (its own events are no
    /// leftovers).
    pub(super) left: Vec<(String, u64)>,
    /// Running events, each with its key, sequence and whether it is a
    /// copy (see [`Queues::arrive`]).
    pub(super) running: JoinSet<(String, u64, Settled, bool)>,
    /// Copies of running events, to run beside them.
    pub(super) copies: Vec<(String, u64, jetstream::Message, Slot, Seen)>,
}

impl Queues {
    pub(super) fn knows(&self, key: &str, seq: u64) -> bool {
        self.keys.get(key).is_some_and(|q| q.contains_key(&seq))
    }

    pub(super) fn arrive(&mut self, a: Arrival, seen: Seen) {
        let q = self.keys.entry(a.key.clone()).or_default();
        // A copy of an event running here is the server's redelivery after
        // `ack_wait` (its in-progress acks were lost, in an election). It
        // runs as any handler's copy does: it waits for the running one's
        // outcome, keeping itself alive, then skips (or retries) by the
        // inbox. Left unanswered, the server would send it again and again,
        // spending the event's deliveries.
        if matches!(q.get(&a.seq), Some(Entry::Running)) {
            self.copies.push((a.key, a.seq, a.msg, a.slot, seen));
        } else {
            let now = Instant::now();
            q.insert(
                a.seq,
                Entry::Here(Box::new(Waiting {
                    msg: a.msg,
                    slot: a.slot,
                    seen,
                    arrived: now,
                    alive: now,
                })),
            );
            self.touched.insert(a.key);
        }
    }

    pub(super) fn expect(&mut self, key: String, seq: u64) {
        self.keys
            .entry(key)
            .or_default()
            .entry(seq)
            .or_insert(Entry::Expected(Instant::now()));
    }

    pub(super) fn settled(&mut self, key: String, seq: u64, settled: Settled, copy: bool) {
        if let Some(q) = self.keys.get_mut(&key) {
            match settled {
                // A copy decides only once the first run is over.
                _ if copy && matches!(q.get(&seq), Some(Entry::Running)) => {}
                Settled::Back if copy => {}
                Settled::Gone => {
                    q.remove(&seq);
                }
                Settled::Back if !self.holding => {
                    // Its redelivery goes to the holder; what waits behind
                    // it here must not overtake it.
                    q.retain(|_, e| matches!(e, Entry::Running));
                }
                Settled::Back => {
                    q.insert(seq, Entry::Expected(Instant::now()));
                }
            }
            if q.is_empty() {
                self.keys.remove(&key);
            } else {
                self.touched.insert(key);
            }
        }
    }

    /// The events that may run now: each touched key's head, if it is here.
    pub(super) fn ready(&mut self) -> Vec<(String, u64, jetstream::Message, Slot, Seen)> {
        let mut out = Vec::new();
        for key in self.touched.drain() {
            let Some(q) = self.keys.get_mut(&key) else {
                continue;
            };
            let Some(mut head) = q.first_entry() else {
                continue;
            };
            if matches!(head.get(), Entry::Here(..)) {
                let seq = *head.key();
                if let Entry::Here(w) = head.insert(Entry::Running) {
                    let seen = if w.arrived.elapsed() <= SEEN_FOR {
                        w.seen
                    } else {
                        Seen::NotRead
                    };
                    out.push((key, seq, w.msg, w.slot, seen));
                }
            }
        }
        out
    }

    /// The pin went elsewhere: the keys waiting for a retry or for an
    /// event of another holder are dropped here (the holder gets them);
    /// the others go on with what was delivered here.
    pub(super) fn let_go(&mut self) {
        self.holding = false;
        self.keys.retain(|_, q| {
            let blocked = q
                .first_key_value()
                .is_some_and(|(_, e)| matches!(e, Entry::Expected(_)));
            if blocked {
                q.retain(|_, e| matches!(e, Entry::Running));
            }
            !q.is_empty()
        });
    }

    /// Whether nothing of this instance is left: no event here or running.
    pub(super) fn idle(&self) -> bool {
        self.running.is_empty()
            && self
                .keys
                .values()
                .all(|q| q.values().all(|e| matches!(e, Entry::Expected(_))))
    }
}

/// The key of an event: its ordering fields' tokens, read from its subject
/// as published (`tokens` are their 0-based positions).
pub(super) fn key_of_subject(subject: &str, tokens: &[usize]) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    let mut key = String::new();
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        key.push_str(parts.get(*t).copied().unwrap_or(""));
    }
    key
}

/// An event that arrived, to be queued under its key.
pub(super) struct Arrival {
    pub(super) key: String,
    pub(super) seq: u64,
    pub(super) msg: jetstream::Message,
    pub(super) slot: Slot,
}

/// Queues a pulled chunk, having read its inbox keys with one request
/// (as the unordered pull loop does), so that events later in a key's
/// queue do not each read their own.
pub(super) async fn queue_all(rt: &Runtime, q: &mut Queues, chunk: Vec<Arrival>) {
    if chunk.is_empty() {
        return;
    }
    // From two events: a partition's chunks are small (its share of the
    // deliveries), and its events wait in their keys' queues anyway.
    let seen = pull::read_inbox(rt, chunk.iter().map(|a| &a.msg), 2).await;
    for (a, seen) in chunk.into_iter().zip(seen) {
        q.arrive(a, seen);
    }
    let mut left = 0_usize;
    for (key, seq) in std::mem::take(&mut q.left) {
        if !q.knows(&key, seq) {
            q.expect(key, seq);
            left += 1;
        }
    }
    if left > 0
        && let Some(part) = rt.partition.as_ref()
    {
        tracing::info!(service = %rt.service, handler = rt.handler, partition = part.part, left, "took the partition over: its keys wait for the events the last holder left");
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::Settled;

    use super::{Entry, Queues, key_of_subject};

    #[test]
    fn a_copy_of_a_running_event_decides_only_after_the_first_run() {
        let mut q = Queues {
            holding: true,
            ..Queues::default()
        };
        q.keys
            .entry("a".into())
            .or_default()
            .insert(5, Entry::Running);
        // The copy skipped while the first still ran: nothing changes.
        q.settled("a".into(), 5, Settled::Gone, true);
        assert!(matches!(q.keys["a"].get(&5), Some(Entry::Running)));
        // The first failed: its retry is expected.
        q.settled("a".into(), 5, Settled::Back, false);
        assert!(matches!(q.keys["a"].get(&5), Some(Entry::Expected(_))));
        // A copy that fails leaves it expected; one that succeeds ends it.
        q.settled("a".into(), 5, Settled::Back, true);
        assert!(matches!(q.keys["a"].get(&5), Some(Entry::Expected(_))));
        q.settled("a".into(), 5, Settled::Gone, true);
        assert!(!q.keys.contains_key("a"));
    }

    #[test]
    fn an_entry_is_small_so_a_new_keys_queue_is_a_small_allocation() {
        // A `BTreeMap`'s first node holds room for 11 entries: with the
        // waiting event inline (about 490 bytes) it was 5.5 KB per new key.
        let entry = std::mem::size_of::<Entry>();
        assert!(entry <= 32, "an Entry is {entry} bytes");
    }

    #[test]
    fn a_key_is_its_ordering_fields_tokens() {
        assert_eq!(key_of_subject("ledger.a-7.stepped", &[1]), "a-7");
        assert_eq!(key_of_subject("t.acme.a-7.x", &[1, 2]), "acme.a-7");
    }
}
