//! [`HandlerOptions`]: how one handler consumes its events.

use std::time::Duration;

use time::OffsetDateTime;

/// Where a new durable consumer starts reading its stream. Applies only when
/// the consumer is created; an existing durable keeps its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliverPolicy {
    /// Every event still in the stream (the default): nothing published
    /// before the service's first start is missed.
    All,
    /// Only events published after the consumer is created.
    New,
    /// Events published at or after this time.
    Since(OffsetDateTime),
}

/// The default [`HandlerOptions::timeout`]: 5 minutes, long enough for any
/// handler that is making progress, short enough that a hung one frees its
/// event within one deploy's patience.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How one handler consumes its events. `#[event_handler(...)]` sets these;
/// every field has a default.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerOptions {
    /// Events handled at once by one service instance. Default 256: handlers
    /// mostly wait on I/O, and JetStream needs many acks in flight to be fast.
    /// The instance pulls up to a quarter more, which wait for a turn with
    /// their in-progress acks going on (so pull requests can be large).
    pub concurrency: usize,
    /// Deliveries before an event goes to the dead-letter stream. Default 5;
    /// never unlimited.
    pub max_deliver: u32,
    /// Delay before redelivery after the n-th failed attempt (the last entry
    /// repeats). Default 1 s, 5 s, 30 s.
    pub backoff: Vec<Duration>,
    /// How long JetStream waits for a verdict before redelivering. Running
    /// handlers send in-progress acks, so this bounds silence, not handler
    /// time. Default 30 s.
    pub ack_wait: Duration,
    /// How long one invocation may run before it is abandoned: its future
    /// is dropped, in-progress acks stop, and the attempt counts as a
    /// retryable failure (on the last allowed delivery the event is
    /// dead-lettered with reason `timeout`). Default 5 minutes. A handler
    /// that blocks its thread cannot be dropped; its in-progress acks still
    /// stop, so JetStream redelivers the event elsewhere after `ack_wait`.
    pub timeout: Duration,
    /// Where a new consumer starts. Default [`DeliverPolicy::All`].
    pub deliver: DeliverPolicy,
    /// Whether the service's inbox skips events this handler already
    /// handled. Default on.
    pub idempotent: bool,
    /// Per-key order (`#[event_handler(ordered_by = ..)]`), or `None`:
    /// events run in any order, up to `concurrency` at once.
    pub ordered: Option<Ordered>,
}

/// The default number of partitions of an ordered handler: 16 durable
/// consumers, shared out among its instances, each with up to
/// [`PARTITION_WINDOW`](crate::PARTITION_WINDOW) events of different keys
/// at once.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// How an ordered handler orders its events (`#[event_handler(ordered_by
/// = account)]`, `partitions = n`). Events whose ordering fields are equal
/// go to the same partition and run one at a time, in stream order; a
/// partition runs on one instance at a time, up to
/// [`PARTITION_WINDOW`](crate::PARTITION_WINDOW) events of different keys
/// at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ordered {
    /// The fields that group the events to order (each fills a `{field}`
    /// of the event's subject).
    pub by: &'static [&'static str],
    /// How many partitions ([`DEFAULT_PARTITIONS`] by default).
    pub partitions: u16,
}

/// Where `field` fills a `{field}` token among `placeholders`.
pub(crate) const fn placeholder_index(placeholders: &[&str], field: &str) -> Option<usize> {
    let mut i = 0;
    while i < placeholders.len() {
        let (a, b) = (placeholders[i].as_bytes(), field.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ack_wait: Duration::from_secs(30),
            timeout: DEFAULT_TIMEOUT,
            deliver: DeliverPolicy::All,
            idempotent: true,
            ordered: None,
        }
    }
}

impl HandlerOptions {
    /// The durable's configuration these options make.
    pub(crate) fn consumer_spec(&self) -> crate::topology::consumer::ConsumerSpec {
        use async_nats::jetstream::consumer::DeliverPolicy as D;
        crate::topology::consumer::ConsumerSpec {
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            concurrency: self.concurrency,
            deliver: match self.deliver {
                DeliverPolicy::All => D::All,
                DeliverPolicy::New => D::New,
                DeliverPolicy::Since(t) => D::ByStartTime { start_time: t },
            },
        }
    }

    /// Makes the handler ordered by the fields `by` over `partitions`
    /// partitions (0: [`DEFAULT_PARTITIONS`]).
    pub fn ordered(mut self, by: &'static [&'static str], partitions: u16) -> Self {
        self.ordered = Some(Ordered {
            by,
            partitions: if partitions == 0 {
                DEFAULT_PARTITIONS
            } else {
                partitions
            },
        });
        self
    }

    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
    /// Sets [`max_deliver`](Self::max_deliver).
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = n;
        self
    }
    /// Sets [`backoff`](Self::backoff).
    pub fn backoff(mut self, delays: Vec<Duration>) -> Self {
        self.backoff = delays;
        self
    }
    /// Sets [`ack_wait`](Self::ack_wait).
    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.ack_wait = d;
        self
    }
    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Sets [`deliver`](Self::deliver).
    pub fn deliver(mut self, d: DeliverPolicy) -> Self {
        self.deliver = d;
        self
    }
    /// Sets [`idempotent`](Self::idempotent).
    pub fn idempotent(mut self, on: bool) -> Self {
        self.idempotent = on;
        self
    }

    /// The redelivery delay after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}
