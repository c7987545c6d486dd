//! The per-handler runtime. An event goes `pull` (asks for events as permits
//! free up through `requests`, reads a batch's inbox keys at once) →
//! `process` (decode, look up, run under the panic guard and the timeout) →
//! `settle` (emit, record, ack; or dead-letter). Beside it: `watchdog`
//! (in-progress acks, claims, timeouts), `upkeep` (the consumer as the
//! server has it) and `advisory` (lost last deliveries).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::Semaphore;

use crate::event::Event;
use crate::handler::{BoxFuture, Handler, HandlerOptions, MissingState, States};
use crate::inbox::{Inbox, Record};
use crate::publish::Publisher;
use crate::topology::ConsumerError;

mod advisory;
mod fault;
mod ordered;
mod process;
mod pull;
mod replay;
mod requests;
mod settle;
mod stats;
mod upkeep;
pub(crate) mod watchdog;

pub use fault::{FaultHook, FaultPoint};
pub use stats::HandlerStats;
pub(crate) use watchdog::Registry;

/// Why a handler's tasks stopped the service: a failure that did not pass
/// within the recovery timeout. The service turns it into a `RunError`.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// The handler's consumer could not be recreated.
    ConsumerLost {
        handler: String,
        failing_for: Duration,
        source: ConsumerError,
    },
    /// The inbox bucket was missing.
    InboxLost {
        bucket: String,
        missing_for: Duration,
    },
}

pub(crate) use advisory::advisory_loop;
pub(crate) use ordered::{Pinning, Share, follow_instances, ordered_loop};
use process::process;
pub(crate) use pull::pull_loop;

/// What every task of one handler shares.
pub(crate) struct Runtime {
    pub(crate) service: Arc<str>,
    pub(crate) handler: &'static str,
    pub(crate) handler_id: Arc<str>,
    pub(crate) stream: &'static str,
    /// The durable this runtime pulls from: `<service>--<handler>`, or a
    /// partition's `<service>--<handler>--p<n>`.
    pub(crate) durable: Arc<str>,
    /// The stream that durable is on: `stream`, or the ordered handler's
    /// partition stream.
    pub(crate) consumer_stream: Arc<str>,
    /// For a partition of an ordered handler: which, and how to remake it.
    pub(crate) partition: Option<Partition>,
    /// The name of the event the handler consumes.
    pub(crate) event_type: &'static str,
    pub(crate) options: HandlerOptions,
    pub(crate) publisher: Publisher,
    pub(crate) states: Arc<States>,
    pub(crate) stats: Arc<HandlerStats>,
    pub(crate) metrics: crate::observe::HandlerMetrics,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) inbox: Option<Inbox>,
    pub(crate) fault: Option<FaultHook>,
    /// The running invocations, kept alive by the watchdog.
    pub(crate) watchdog: Registry,
    /// How long a failure that may pass (the consumer cannot be recreated,
    /// the inbox bucket is missing) is retried before the service stops
    /// with an error.
    pub(crate) recovery_timeout: Duration,
    /// What the server's consumer says, read back after creating it and
    /// every few seconds: it is the truth when instances disagree.
    pub(crate) live: Live,
    /// The range `choreo replay` rewound the handler over.
    pub(crate) replay: replay::Replayed,
    /// Turns to run the handler's code: `concurrency` at once. A handler
    /// pulls up to a quarter more events than that (see
    /// [`requests::headroom`]); each waits for its turn in a task of its
    /// own, registered with the watchdog (so its in-progress acks go on),
    /// and its `timeout` counts from its turn.
    pub(crate) running: Arc<Semaphore>,
}

/// One partition of an ordered handler.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) part: u16,
    pub(crate) partitions: u16,
    /// The 1-based `*` positions of the ordering fields in the filter.
    pub(crate) wildcards: Vec<usize>,
    /// The 0-based positions of the ordering fields' tokens in a subject
    /// as published: an event's key is made of them.
    pub(crate) key_tokens: Vec<usize>,
}

impl Runtime {
    /// Reads the replay marker (at most once a second). Ordered handlers'
    /// partitions never read it: a replay's copies say they are replays.
    pub(crate) async fn follow_replay(&self) {
        if self.partition.is_none() {
            // Boxed: reading the marker is a key-value read whose future
            // is over 6 KB, and this runs on a rewind only; inline, it made
            // every event's future that big.
            Box::pin(self.replay.refresh(&self.js, &self.service, self.handler)).await;
        }
    }

    /// Where an event is stored in its own stream, for its dead letter: a
    /// partition stream's copy names its origin in `Nats-Stream-Source`
    /// (`<stream> <sequence> ...`), which a replay reads back.
    pub(crate) fn origin_of(
        &self,
        headers: Option<&async_nats::HeaderMap>,
        seq: u64,
    ) -> (String, u64) {
        if self.partition.is_none() {
            return (self.stream.to_owned(), seq);
        }
        let source = headers
            .and_then(|h| h.get("Nats-Stream-Source"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let mut tokens = source.split_whitespace();
        match (
            tokens.next(),
            tokens.next().and_then(|s| s.parse::<u64>().ok()),
        ) {
            (Some(stream), Some(origin_seq)) => (stream.to_owned(), origin_seq),
            _ => process::replay_copy(headers)
                .unwrap_or_else(|| (self.consumer_stream.to_string(), seq)),
        }
    }

    /// An event's subject as published: a partition stream's subjects
    /// carry the partition prefix in front.
    pub(crate) fn original_subject<'s>(&self, subject: &'s str) -> &'s str {
        if self.partition.is_none() {
            return subject;
        }
        subject
            .splitn(crate::topology::ordered::PREFIX_TOKENS + 1, '.')
            .nth(crate::topology::ordered::PREFIX_TOKENS)
            .unwrap_or(subject)
    }
}

/// The consumer's settings as the server has them, and its ack floor.
#[derive(Debug, Default)]
pub(crate) struct Live {
    max_deliver: std::sync::atomic::AtomicU32,
    ack_wait_ms: std::sync::atomic::AtomicU64,
    /// Every stream sequence up to this one is acknowledged.
    ack_floor: std::sync::atomic::AtomicU64,
}

impl Live {
    /// Takes the server's view of the consumer; says what changed.
    pub(crate) fn follow(&self, info: &jetstream::consumer::Info) -> Option<String> {
        let c = &info.config;
        self.ack_floor
            .fetch_max(info.ack_floor.stream_sequence, Ordering::Relaxed);
        let max_deliver = u32::try_from(c.max_deliver.max(1)).unwrap_or(u32::MAX);
        let ack_wait = u64::try_from(c.ack_wait.as_millis())
            .unwrap_or(u64::MAX)
            .max(100);
        let old_md = self.max_deliver.swap(max_deliver, Ordering::Relaxed);
        let old_aw = self.ack_wait_ms.swap(ack_wait, Ordering::Relaxed);
        let first = old_md == 0;
        (!first && (old_md != max_deliver || old_aw != ack_wait)).then(|| {
            format!("max_deliver {old_md} -> {max_deliver}, ack_wait {old_aw}ms -> {ack_wait}ms")
        })
    }

    /// The stream sequence every earlier one of which is acknowledged.
    pub(crate) fn ack_floor(&self) -> u64 {
        self.ack_floor.load(Ordering::Relaxed)
    }
}

impl Runtime {
    /// Deliveries before the dead-letter stream, as the server's consumer
    /// has it.
    pub(crate) fn max_deliver(&self) -> u32 {
        match self.live.max_deliver.load(Ordering::Relaxed) {
            0 => self.options.max_deliver,
            n => n,
        }
    }

    /// The consumer's `ack_wait`, as the server has it.
    pub(crate) fn ack_wait(&self) -> Duration {
        match self.live.ack_wait_ms.load(Ordering::Relaxed) {
            0 => self.options.ack_wait,
            ms => Duration::from_millis(ms),
        }
    }
}

/// What the pull loop's batched inbox read said about one event.
pub(crate) enum Seen {
    /// Not read (no inbox, or no readable event id): read when needed.
    NotRead,
    /// The key's record, or `None` if it has none.
    Read(Option<Record>),
}

/// Logs a warning or error about one delivery, with its identity as fields
/// of the line itself — service, handler, event type, event id, subject,
/// attempt and stream sequence — so that logs kept at `warn` say which
/// event it was, whatever the subscriber does with spans.
macro_rules! about {
    ($level:ident, $rt:expr, $msg:expr, $($rest:tt)+) => {{
        let (attempt, stream_sequence) = $crate::runtime::delivery_of($msg);
        tracing::$level!(
            service = %$rt.service,
            handler = %$rt.handler,
            event_type = %$rt.event_type,
            event_id = %$crate::runtime::event_id_of($msg),
            subject = %$msg.subject,
            attempt,
            stream_sequence,
            $($rest)+
        )
    }};
}
pub(crate) use about;

/// A delivery's attempt and stream sequence (1 and 0 if unreadable).
pub(crate) fn delivery_of(msg: &jetstream::Message) -> (u32, u64) {
    let (attempt, sequence, _) = delivery_and_pending(msg);
    (attempt, sequence)
}

/// [`delivery_of`], and the delivery's pending count, from one read of its
/// reply subject.
pub(crate) fn delivery_and_pending(msg: &jetstream::Message) -> (u32, u64, u64) {
    match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            info.stream_sequence,
            info.pending,
        ),
        Err(_) => (1, 0, 0),
    }
}

/// A delivery's `ce-id` as sent (`-` if it has none).
pub(crate) fn event_id_of(msg: &jetstream::Message) -> &str {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(crate::wire::headers::CE_ID))
        .map_or("-", |v| v.as_str())
}

/// A handler with its event type erased.
pub(crate) trait Erased: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn event_type(&self) -> &'static str;
    fn options(&self) -> HandlerOptions;
    fn stream(&self) -> (&'static str, &'static str, &'static str);
    fn emits(&self) -> Option<&'static [crate::event::EventType]>;
    fn consumes(&self) -> crate::event::EventType;
    fn accepted_versions(&self) -> Vec<u32>;
    /// For an ordered handler: the 1-based `*` positions, in the event's
    /// subject filter, of the fields it orders by.
    fn ordering_wildcards(&self) -> Option<Vec<usize>>;
    /// For a deadline handler: its deadline.
    fn deadline(&self) -> Option<crate::handler::Deadline>;
    /// For a deadline's helper consumer: its deadline handler's name.
    fn part_of(&self) -> Option<&'static str>;
    fn check(&self, states: &States) -> Result<(), MissingState>;
    /// Handles one delivery; `at` is its attempt and stream sequence, read
    /// from its reply subject once, where it arrived.
    fn process(
        self: Arc<Self>,
        msg: jetstream::Message,
        at: (u32, u64),
        seen: Seen,
        rt: Arc<Runtime>,
    ) -> BoxFuture<Settled>;
}

/// Where one delivery ended, for an ordered handler's scheduler: the
/// event left the stream (acknowledged, skipped, or dead-lettered), or it
/// comes back (nak'd for a retry, or no verdict: redelivered after
/// `ack_wait`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acknowledged or terminated.
    Gone,
    /// Nak'd, or left without a verdict.
    Back,
}

pub(crate) struct Typed<H>(pub(crate) H);

impl<H> std::fmt::Debug for Typed<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::any::type_name::<H>())
    }
}

impl<H: Handler> Erased for Typed<H> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn event_type(&self) -> &'static str {
        H::Event::NAME
    }
    fn emits(&self) -> Option<&'static [crate::event::EventType]> {
        self.0.emits()
    }
    fn consumes(&self) -> crate::event::EventType {
        crate::event::EventType::of::<H::Event>()
    }
    fn accepted_versions(&self) -> Vec<u32> {
        (1..=H::Event::VERSION)
            .filter(|v| H::Event::accepts_version(*v))
            .collect()
    }
    fn options(&self) -> HandlerOptions {
        self.0.options()
    }
    fn deadline(&self) -> Option<crate::handler::Deadline> {
        self.0.deadline()
    }
    fn part_of(&self) -> Option<&'static str> {
        self.0.part_of()
    }
    fn ordering_wildcards(&self) -> Option<Vec<usize>> {
        let ordered = self.0.options().ordered?;
        // `{field}` tokens become `*` in the filter, in template order.
        ordered
            .by
            .iter()
            .map(|f| crate::handler::placeholder_index(H::Event::PLACEHOLDERS, f).map(|i| i + 1))
            .collect()
    }
    fn stream(&self) -> (&'static str, &'static str, &'static str) {
        (
            H::Event::STREAM,
            H::Event::STREAM_SUBJECTS,
            H::Event::SUBJECT_FILTER,
        )
    }
    fn check(&self, states: &States) -> Result<(), MissingState> {
        self.0.check(states)
    }
    fn process(
        self: Arc<Self>,
        msg: jetstream::Message,
        at: (u32, u64),
        seen: Seen,
        rt: Arc<Runtime>,
    ) -> BoxFuture<Settled> {
        Box::pin(process::<H>(self, msg, at, seen, rt))
    }
}

/// A handler that reads a stream other than its event's own (a deadline
/// handler reads its fired copies from the deadline stream): [`Typed`]
/// with the stream, its subjects and the filter it consumes.
pub(crate) struct Routed<H> {
    pub(crate) inner: Arc<Typed<H>>,
    pub(crate) stream: (&'static str, &'static str, &'static str),
}

impl<H> std::fmt::Debug for Routed<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} on {}", self.inner, self.stream.2)
    }
}

impl<H: Handler> Erased for Routed<H> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn event_type(&self) -> &'static str {
        self.inner.event_type()
    }
    fn emits(&self) -> Option<&'static [crate::event::EventType]> {
        self.inner.emits()
    }
    fn consumes(&self) -> crate::event::EventType {
        self.inner.consumes()
    }
    fn accepted_versions(&self) -> Vec<u32> {
        self.inner.accepted_versions()
    }
    fn options(&self) -> HandlerOptions {
        self.inner.options()
    }
    fn ordering_wildcards(&self) -> Option<Vec<usize>> {
        None
    }
    fn deadline(&self) -> Option<crate::handler::Deadline> {
        self.inner.deadline()
    }
    fn part_of(&self) -> Option<&'static str> {
        self.inner.part_of()
    }
    fn stream(&self) -> (&'static str, &'static str, &'static str) {
        self.stream
    }
    fn check(&self, states: &States) -> Result<(), MissingState> {
        self.inner.check(states)
    }
    fn process(
        self: Arc<Self>,
        msg: jetstream::Message,
        at: (u32, u64),
        seen: Seen,
        rt: Arc<Runtime>,
    ) -> BoxFuture<Settled> {
        Box::pin(process::<H>(self.inner.clone(), msg, at, seen, rt))
    }
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}
