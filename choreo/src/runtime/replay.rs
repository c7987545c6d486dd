//! The range `choreo replay` rewound a handler over (`admin::replay`
//! writes it as a marker in `choreo_replays` before it rewinds the
//! durable), as one instance knows it: two atomics read per event, and the
//! marker read at most once a second.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::{self, kv};

use crate::topology::{REPLAYS_BUCKET, ReplayMarker, replay_key};

/// How often the marker is read at most.
const READ_EVERY_MS: u64 = 1_000;

#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// First and last replayed stream sequence; `from` 0: none.
    from: AtomicU64,
    until: AtomicU64,
    /// When the marker was last read, Unix ms.
    read_at_ms: AtomicU64,
    /// The bucket, once it exists (one lookup, not one per read).
    store: tokio::sync::OnceCell<kv::Store>,
}

impl Replayed {
    /// Whether stream sequence `seq` is in the replayed range.
    pub(crate) fn covers(&self, seq: u64) -> bool {
        let from = self.from.load(Ordering::Relaxed);
        from != 0 && seq >= from && seq <= self.until.load(Ordering::Relaxed)
    }

    /// Reads the marker of `service`'s `handler`, unless it was read less
    /// than a second ago.
    pub(crate) async fn refresh(&self, js: &jetstream::Context, service: &str, handler: &str) {
        let now = crate::event::now_ms();
        let last = self.read_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < READ_EVERY_MS
            || self
                .read_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let store = match self.store.get() {
            Some(s) => s,
            None => match js.get_key_value(REPLAYS_BUCKET).await {
                // No replay was ever made here.
                Err(_) => return,
                Ok(s) => self.store.get_or_init(|| async { s }).await,
            },
        };
        let (from, until) = match store.get(replay_key(service, handler)).await {
            Ok(Some(v)) => serde_json::from_slice::<ReplayMarker>(&v)
                .map_or((0, 0), |m| (m.from.max(1), m.until)),
            Ok(None) => (0, 0),
            // Unreadable now: keep what was known.
            Err(_) => return,
        };
        self.until.store(until, Ordering::Relaxed);
        self.from.store(from, Ordering::Relaxed);
    }
}
