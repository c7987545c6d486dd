//! [`HandlerStats`]: the counters of one handler in one service instance.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one handler, shared by every task of one service instance.
#[derive(Debug, Default)]
pub struct HandlerStats {
    pub(crate) handled: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) waited: AtomicU64,
    pub(crate) in_progress_acks: AtomicU64,
    pub(crate) inbox_batch_reads: AtomicU64,
    pub(crate) inbox_batch_failures: AtomicU64,
    pub(crate) inbox_conflicts: AtomicU64,
    pub(crate) backlog_at_start: u64,
    pub(crate) task_panics: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) take_over_retries: AtomicU64,
}

impl HandlerStats {
    pub(crate) fn starting_with(backlog: u64) -> Self {
        Self {
            backlog_at_start: backlog,
            ..Self::default()
        }
    }

    /// Events stored on the handler's subjects that its consumer had yet to
    /// deliver when the instance started: for a new consumer, what its
    /// `deliver` policy takes from the stream's history.
    pub fn backlog_at_start(&self) -> u64 {
        self.backlog_at_start
    }
    /// Events handled successfully (emissions published, acked).
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
    /// Deliveries that failed and were scheduled for redelivery.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }
    /// Events sent to the dead-letter stream.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }
    /// Invocations that panicked (each also counted as retried or dead-lettered).
    pub fn panicked(&self) -> u64 {
        self.panicked.load(Ordering::Relaxed)
    }
    /// Deliveries that found another instance running the handler for the
    /// same event (its claim in the inbox) and waited for its outcome.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }
    /// Deliveries acked and skipped because the inbox shows the event handled.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
    /// In-progress acks the watchdog sent for invocations running longer
    /// than a third of `ack_wait`.
    pub fn in_progress_acks(&self) -> u64 {
        self.in_progress_acks.load(Ordering::Relaxed)
    }
    /// Tasks that panicked outside the handler's panic guard (a bug in
    /// choreo or a fault hook); each is logged at `error`, and its event is
    /// redelivered after `ack_wait`.
    pub fn task_panics(&self) -> u64 {
        self.task_panics.load(Ordering::Relaxed)
    }
    /// Invocations abandoned because they ran past the handler's
    /// [`timeout`](crate::HandlerOptions::timeout) (each also counted as
    /// retried or dead-lettered).
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
    /// For an ordered handler: failed reads of what a partition's last
    /// holder left, each tried again before the partition went on.
    pub fn take_over_retries(&self) -> u64 {
        self.take_over_retries.load(Ordering::Relaxed)
    }
    /// Batched inbox reads: one per pulled batch of eight or more events,
    /// each reading the whole batch's keys with one request.
    pub fn inbox_batch_reads(&self) -> u64 {
        self.inbox_batch_reads.load(Ordering::Relaxed)
    }
    /// Batched inbox reads that failed (their events then read their own
    /// keys): a denied or refused request, no answer in time.
    pub fn inbox_batch_failures(&self) -> u64 {
        self.inbox_batch_failures.load(Ordering::Relaxed)
    }
    /// Writes of a record that found its group changed since it was read
    /// (another record written in between; on a cluster, also one still
    /// being replicated) and were made again on top of the group's new
    /// value. Some are expected under load; many say that instances write
    /// into few groups at once.
    pub fn inbox_conflicts(&self) -> u64 {
        self.inbox_conflicts.load(Ordering::Relaxed)
    }
}
