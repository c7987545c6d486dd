//! How the partitions of one ordered handler are shared among the
//! instances of its service: each takes a fair share, the partitions over
//! the live instances in the registry, rounded up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;

/// How the partitions of one ordered handler are shared among instances.
#[derive(Debug)]
pub(crate) struct Share {
    partitions: usize,
    /// Partitions this instance holds the pin of.
    pub(super) held: AtomicUsize,
    /// Live instances of the service, from the registry (at least 1).
    pub(super) instances: AtomicUsize,
    /// Partitions this instance is letting go of.
    releasing: AtomicUsize,
}

impl Share {
    pub(crate) fn new(partitions: u16) -> Arc<Self> {
        Arc::new(Self {
            partitions: usize::from(partitions),
            held: AtomicUsize::new(0),
            instances: AtomicUsize::new(1),
            releasing: AtomicUsize::new(0),
        })
    }

    /// This instance's fair share: the partitions over the instances,
    /// rounded up.
    pub(crate) fn fair(&self) -> usize {
        self.partitions
            .div_ceil(self.instances.load(Ordering::Relaxed).max(1))
    }

    pub(super) fn wants_more(&self) -> bool {
        self.held.load(Ordering::Relaxed) < self.fair()
    }

    #[cfg(test)]
    fn has_too_many(&self) -> bool {
        self.held.load(Ordering::Relaxed) > self.fair()
    }

    /// Starts letting one held partition go if this instance holds more
    /// than its fair share, counting those already going (several
    /// partitions may ask at once; only the extra ones go).
    pub(super) fn let_one_go(&self) -> bool {
        let fair = self.fair();
        let held = self.held.load(Ordering::Relaxed);
        self.releasing
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |r| {
                (held.saturating_sub(r) > fair).then_some(r + 1)
            })
            .is_ok()
    }

    /// A release ended (the pin went, or moved on its own).
    pub(super) fn released_one(&self) {
        self.releasing.fetch_sub(1, Ordering::AcqRel);
    }

    /// How many partitions this instance holds.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Keeps `share`'s instance count: the service's instances the registry
/// shows live, read every two seconds.
pub(crate) async fn follow_instances(
    js: jetstream::Context,
    service: Arc<str>,
    share: Arc<Share>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Ok(all) = crate::registry::instances(&js).await {
            let now = crate::registry::now_ms();
            let live = all
                .iter()
                .filter(|i| i.manifest.service == *service && !i.stale(now))
                .count();
            share.instances.store(live.max(1), Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::Share;

    #[test]
    fn a_fair_share_rounds_up() {
        let s = Share::new(16);
        assert_eq!(s.fair(), 16);
        s.instances.store(3, Ordering::Relaxed);
        assert_eq!(s.fair(), 6);
        s.held.store(6, Ordering::Relaxed);
        assert!(!s.wants_more() && !s.has_too_many());
        s.instances.store(4, Ordering::Relaxed);
        assert!(s.has_too_many());
        // 16 over 4: 4 each; two of the six go.
        assert!(s.let_one_go() && s.let_one_go() && !s.let_one_go());
        s.held.store(5, Ordering::Relaxed);
        s.released_one();
        assert!(!s.let_one_go());
    }
}
