//! The flow recorder and its assertions.
//!
//! A [`Recorder`] reads every choreo event stored in the streams it watches
//! (ordered consumers from the first message, so nothing published before it
//! started is missed) and keeps each event's metadata. Tests then wait for
//! events ([`Recorder::expect`], [`Recorder::expect_none`]), take a whole flow
//! by correlation id ([`Recorder::flow`], [`Recorder::quiescent`]) and assert
//! its shape. Every failure message shows what did arrive, as a causation
//! tree.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use choreo::JetStreamApi;
use choreo::{Event, EventId, Metadata};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::TestkitError;

/// One recorded event.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Recorded {
    /// Its metadata (id, type, source, time, correlation, causation).
    pub meta: Metadata,
    /// Its subject.
    pub subject: String,
    /// The stream that stores it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// Its CBOR payload.
    pub payload: Bytes,
    /// On a copy a replay stored again, what replayed it: its
    /// `choreo-replay` header (`dlq <letter sequence> <service>.<handler>`, or the
    /// `<service>.<handler>` that `choreo replay` rewound).
    pub replay: Option<String>,
}

/// A flow assertion failed. Its message says what was expected and shows the
/// causation tree of what arrived.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FlowError(pub(crate) String);

/// A typed event the recorder saw.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Seen<E> {
    /// The event.
    pub event: E,
    /// Its metadata.
    pub meta: Metadata,
    /// Its subject.
    pub subject: String,
}

struct Shared {
    events: Mutex<Vec<Recorded>>,
    /// How many events are recorded: a waiter marks the count it has seen
    /// before it looks, so an event recorded between its look and its wait
    /// wakes it (no lost wake-ups).
    count: watch::Sender<usize>,
    /// The last stream sequence read from each stream (choreo event or not).
    read_to: Mutex<HashMap<String, u64>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            events: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            read_to: Mutex::new(HashMap::new()),
        }
    }
}

impl Shared {
    fn events(&self) -> std::sync::MutexGuard<'_, Vec<Recorded>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_to(&self, stream: &str) -> u64 {
        self.read_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(stream)
            .copied()
            .unwrap_or(0)
    }
}

/// Records choreo events from JetStream streams. Stops when dropped.
pub struct Recorder {
    shared: Arc<Shared>,
    api: JetStreamApi,
    /// For reads beside the recording (a deadline's state).
    pub(crate) js: async_nats::jetstream::Context,
    // Dropping the recorder aborts its stream readers.
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("events", &self.snapshot().len())
            .finish()
    }
}

/// Streams the recorder never reads: dead letters (copies of events already
/// recorded), advisories, key-value buckets and deadlines (schedules and
/// fired copies of events already recorded).
fn is_infrastructure(stream: &str) -> bool {
    stream == choreo::dlq::DLQ_STREAM
        || stream == choreo::admin::deadlines::STREAM
        || stream == choreo::dlq::ADVISORY_STREAM
        || stream.starts_with("KV_")
}

impl Recorder {
    /// Records every choreo stream, those that exist now and those created
    /// later (dead-letter, advisory and key-value streams excluded).
    ///
    /// # Errors
    /// JetStream is not reachable.
    pub async fn start(client: &async_nats::Client) -> Result<Self, TestkitError> {
        Self::launch(client, None, JetStreamApi::default()).await
    }

    /// As [`start`](Self::start), through `api` (a JetStream domain or an
    /// API prefix).
    ///
    /// # Errors
    /// JetStream is not reachable there.
    pub async fn start_with(
        client: &async_nats::Client,
        api: &JetStreamApi,
    ) -> Result<Self, TestkitError> {
        Self::launch(client, None, api.clone()).await
    }

    /// Records only the named streams (they may be created later).
    ///
    /// # Errors
    /// JetStream is not reachable.
    pub async fn streams(
        client: &async_nats::Client,
        streams: &[&str],
    ) -> Result<Self, TestkitError> {
        Self::launch(
            client,
            Some(streams.iter().map(|s| (*s).to_owned()).collect()),
            JetStreamApi::default(),
        )
        .await
    }

    async fn launch(
        client: &async_nats::Client,
        only: Option<HashSet<String>>,
        api: JetStreamApi,
    ) -> Result<Self, TestkitError> {
        let js = api.context(client.clone());
        js.query_account()
            .await
            .map_err(|e| TestkitError::Connect {
                url: "(recorder)".into(),
                source: Box::new(e),
            })?;
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        let watcher_shared = shared.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(watch_streams(js.clone(), only, watcher_shared, ready_tx));
        // The first scan attaches to the streams that exist now.
        let _ = ready_rx.await;
        Ok(Self {
            shared,
            api,
            js,
            _tasks: tasks,
        })
    }

    /// Every event recorded so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Recorded> {
        self.shared.events().clone()
    }

    /// The recorded events of one flow (copying only those).
    fn flow_events(&self, correlation: EventId) -> Vec<Recorded> {
        self.shared
            .events()
            .iter()
            .filter(|r| r.meta.correlation_id() == correlation)
            .cloned()
            .collect()
    }

    /// Waits until every choreo consumer on the server has nothing pending
    /// and nothing unacknowledged, and the recorder has read every stored
    /// event, all in one pass during which no stream grew: the system has
    /// settled. A steadier alternative to time-based quiescence; fails after
    /// `within`, naming what was still busy.
    ///
    /// # Errors
    /// Something was still pending when `within` ran out.
    pub async fn settled(
        &self,
        client: &async_nats::Client,
        within: Duration,
    ) -> Result<(), FlowError> {
        let js = self.api.context(client.clone());
        let deadline = Instant::now() + within;
        loop {
            let busy = match self.busy(&js).await {
                Ok(busy) => busy,
                Err(e) => Some(e),
            };
            let Some(busy) = busy else { return Ok(()) };
            if Instant::now() >= deadline {
                return Err(FlowError(format!(
                    "the system did not settle within {within:?}: {busy}\n{}",
                    self.all_trees()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What is still busy, if anything: one pass over every stream.
    async fn busy(&self, js: &jetstream::Context) -> Result<Option<String>, String> {
        let mut names = js.stream_names();
        let mut streams = Vec::new();
        while let Some(name) = names.next().await {
            streams.push(name.map_err(|e| e.to_string())?);
        }
        let mut last_before = HashMap::new();
        for name in &streams {
            if name.starts_with("KV_") {
                continue;
            }
            let mut stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
            let last = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            last_before.insert(name.clone(), last);
            if !is_infrastructure(name) && self.shared.read_to(name) < last {
                return Ok(Some(format!(
                    "the recorder has read stream {name} to {} of {last}",
                    self.shared.read_to(name)
                )));
            }
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.map_err(|e| e.to_string())?;
                if info.config.durable_name.is_none() {
                    continue;
                }
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return Ok(Some(format!(
                        "consumer {} on {name} has {} pending and {} unacknowledged",
                        info.name, info.num_pending, info.num_ack_pending
                    )));
                }
            }
        }
        // Nothing grew while the pass ran (a handler acking one consumer
        // may have published to a stream already looked at).
        for (name, before) in last_before {
            let mut stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
            let now = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            if now != before {
                return Ok(Some(format!("stream {name} grew while it was checked")));
            }
        }
        Ok(None)
    }

    /// Waits for an event of type `E`; see [`Expect`].
    pub fn expect<E: Event>(&self) -> Expect<'_, E> {
        Wait::new(self)
    }

    /// Asserts that no event of type `E` arrives; see [`ExpectNone`].
    pub fn expect_none<E: Event>(&self) -> ExpectNone<'_, E> {
        Wait::new(self)
    }

    /// The flow of `correlation` as recorded so far.
    pub fn flow(&self, correlation: EventId) -> Flow {
        Flow::new(correlation, self.flow_events(correlation))
    }

    /// Waits until the flow of `correlation` has at least one event and no
    /// new one for `quiet`, then returns it; fails after `within`.
    ///
    /// # Errors
    /// The flow was still changing (or empty) when `within` ran out.
    pub async fn quiescent(
        &self,
        correlation: EventId,
        quiet: Duration,
        within: Duration,
    ) -> Result<Flow, FlowError> {
        let deadline = Instant::now() + within;
        let mut changed = self.shared.count.subscribe();
        let (mut cursor, mut count) = (0, 0);
        let mut since = Instant::now();
        loop {
            changed.borrow_and_update();
            // Only what arrived since the last look is examined.
            let new = {
                let events = self.shared.events();
                let new = events[cursor..]
                    .iter()
                    .filter(|r| r.meta.correlation_id() == correlation)
                    .count();
                cursor = events.len();
                new
            };
            if new > 0 {
                count += new;
                since = Instant::now();
            }
            if count > 0 && since.elapsed() >= quiet {
                return Ok(self.flow(correlation));
            }
            if Instant::now() >= deadline {
                return Err(FlowError(format!(
                    "flow {} did not go quiet for {quiet:?} within {within:?}\n{}",
                    correlation.short(),
                    self.flow(correlation).tree()
                )));
            }
            let wake = if count > 0 {
                (since + quiet).min(deadline)
            } else {
                deadline
            };
            let _ = tokio::time::timeout(
                wake.saturating_duration_since(Instant::now()),
                changed.changed(),
            )
            .await;
        }
    }

    /// Every flow seen so far, as trees (for failure messages).
    fn all_trees(&self) -> String {
        let events = self.snapshot();
        let mut corrs: Vec<EventId> = Vec::new();
        for e in &events {
            if !corrs.contains(&e.meta.correlation_id()) {
                corrs.push(e.meta.correlation_id());
            }
        }
        if corrs.is_empty() {
            return "nothing arrived".to_owned();
        }
        let shown = corrs.len().min(10);
        let mut out = format!(
            "what arrived ({}{}):\n",
            plural(corrs.len(), "flow", "flows"),
            if shown < corrs.len() {
                ", last 10 shown"
            } else {
                ""
            }
        );
        for c in &corrs[corrs.len() - shown..] {
            out.push_str(&self.flow(*c).tree());
        }
        out
    }
}

async fn watch_streams(
    js: jetstream::Context,
    only: Option<HashSet<String>>,
    shared: Arc<Shared>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    // Each attached stream's reader, and where it stood at the last check.
    let mut attached: HashMap<String, (tokio::task::AbortHandle, u64)> = HashMap::new();
    let mut readers = JoinSet::new();
    let mut ready = Some(ready);
    let mut round = 0_u64;
    // While a node is down the JetStream API may not answer: each look is
    // bounded, so one slow answer cannot hold the catch-up below back.
    let quick = Duration::from_millis(800);
    loop {
        let mut found = Vec::new();
        let _ = tokio::time::timeout(quick, async {
            let mut names = js.stream_names();
            while let Some(Ok(name)) = names.next().await {
                found.push(name);
            }
        })
        .await;
        for name in found {
            let wanted = match &only {
                Some(set) => set.contains(&name),
                None => !is_infrastructure(&name),
            };
            if wanted
                && !attached.contains_key(&name)
                && let Ok(Some(reader)) =
                    tokio::time::timeout(quick * 2, attach(&js, &name, 1, &shared, &mut readers))
                        .await
            {
                attached.insert(name, (reader, 0));
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        // Once a second: a reader that stopped advancing while its stream
        // holds more (its ordered consumer lost its stream leader, and would
        // be rebuilt only after missed heartbeats) starts again from where it
        // stood, so the recorder catches up within seconds of a node loss.
        round += 1;
        if round.is_multiple_of(5) {
            for (name, (reader, stood)) in &mut attached {
                let read_to = shared.read_to(name);
                let last = tokio::time::timeout(quick, async {
                    let mut stream = js.get_stream(name.as_str()).await.ok()?;
                    Some(stream.info().await.ok()?.state.last_sequence)
                })
                .await;
                let Ok(Some(last)) = last else { continue };
                let behind = read_to < last;
                if behind && read_to == *stood {
                    let fresh = tokio::time::timeout(
                        quick * 2,
                        attach(&js, name, read_to + 1, &shared, &mut readers),
                    )
                    .await;
                    if let Ok(Some(fresh)) = fresh {
                        reader.abort();
                        *reader = fresh;
                    }
                }
                *stood = read_to;
            }
        }
        // New streams are looked for five times a second; their consumers
        // start from the first message, so nothing is missed meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a reader of `name` from stream sequence `from`.
async fn attach(
    js: &jetstream::Context,
    name: &str,
    from: u64,
    shared: &Arc<Shared>,
    readers: &mut JoinSet<()>,
) -> Option<tokio::task::AbortHandle> {
    let stream = js.get_stream(name).await.ok()?;
    let deliver_policy = if from <= 1 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .ok()?;
    Some(readers.spawn(read_stream(consumer, name.to_owned(), shared.clone())))
}

async fn read_stream(
    consumer: jetstream::consumer::Consumer<pull::OrderedConfig>,
    stream: String,
    shared: Arc<Shared>,
) {
    let Ok(mut messages) = consumer.messages().await else {
        return;
    };
    while let Some(next) = messages.next().await {
        let Ok(msg) = next else { continue };
        let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        {
            // A reader restarted after a stall starts just after what was
            // read, while the one it replaces may still deliver: whichever
            // reads a sequence first records it.
            let mut read_to = shared.read_to.lock().unwrap_or_else(|p| p.into_inner());
            let to = read_to.entry(stream.clone()).or_insert(0);
            if sequence <= *to {
                continue;
            }
            *to = sequence;
        }
        let Some(headers) = msg.headers.as_ref() else {
            continue;
        };
        let Ok(meta) = Metadata::from_headers(headers) else {
            continue;
        };
        let replay = headers
            .get(choreo::headers::CHOREO_REPLAY)
            .map(|v| v.as_str().to_owned());
        let rec = Recorded {
            meta,
            subject: msg.subject.to_string(),
            stream: stream.clone(),
            sequence,
            payload: msg.payload.clone(),
            replay,
        };
        let mut events = shared.events();
        events.push(rec);
        let len = events.len();
        drop(events);
        shared.count.send_replace(len);
    }
}

type Filter<'a, E> = Box<dyn Fn(&E, &Metadata) -> bool + Send + Sync + 'a>;

fn decode<E: Event>(r: &Recorded) -> Option<E> {
    (r.meta.event_type() == E::NAME)
        .then(|| E::decode_payload(r.meta.version(), &r.payload).ok())
        .flatten()
}

/// Marks a [`Wait`] for an event that must arrive ([`Recorder::expect`]).
#[derive(Debug)]
pub enum Present {}
/// Marks a [`Wait`] for an event that must not arrive ([`Recorder::expect_none`]).
#[derive(Debug)]
pub enum Absent {}

/// A wait for one event of type `E`, built by [`Recorder::expect`].
pub type Expect<'r, E> = Wait<'r, E, Present>;
/// An assertion that no event of type `E` arrives, built by
/// [`Recorder::expect_none`].
pub type ExpectNone<'r, E> = Wait<'r, E, Absent>;

/// A wait on the recorder for events of type `E`: [`Expect`] or [`ExpectNone`].
pub struct Wait<'r, E, Mode> {
    recorder: &'r Recorder,
    filter: Filter<'r, E>,
    flow: Option<EventId>,
    _mode: PhantomData<(E, Mode)>,
}

impl<'r, E: Event, Mode> Wait<'r, E, Mode> {
    fn new(recorder: &'r Recorder) -> Self {
        Self {
            recorder,
            filter: Box::new(|_, _| true),
            flow: None,
            _mode: PhantomData,
        }
    }

    /// Only events for which `pred` holds count.
    pub fn matching(mut self, pred: impl Fn(&E) -> bool + Send + Sync + 'r) -> Self {
        self.filter = Box::new(move |e, _| pred(e));
        self
    }

    /// Only events of the flow `correlation` count (failure messages then
    /// show that flow).
    pub fn in_flow(mut self, correlation: EventId) -> Self {
        self.flow = Some(correlation);
        self
    }

    /// The first event that counts among those recorded from `cursor` on;
    /// moves `cursor` past what it examined. Copies only the match.
    fn next_match(&self, cursor: &mut usize) -> Option<(E, Recorded)> {
        let events = self.recorder.shared.events();
        let from = (*cursor).min(events.len());
        *cursor = events.len();
        events[from..].iter().find_map(|r| {
            if self.flow.is_some_and(|c| c != r.meta.correlation_id()) {
                return None;
            }
            let e = decode::<E>(r)?;
            (self.filter)(&e, &r.meta).then(|| (e, r.clone()))
        })
    }
}

impl<E: Event> Wait<'_, E, Present> {
    /// Waits up to `timeout`, returning as soon as a matching event is recorded.
    ///
    /// # Errors
    /// None arrived in time; the message shows what did.
    pub async fn within(self, timeout: Duration) -> Result<Seen<E>, FlowError> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.recorder.shared.count.subscribe();
        let mut cursor = 0;
        loop {
            changed.borrow_and_update();
            if let Some((event, r)) = self.next_match(&mut cursor) {
                return Ok(Seen {
                    event,
                    meta: r.meta,
                    subject: r.subject,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let arrived = match self.flow {
                    Some(c) => self.recorder.flow(c).tree(),
                    None => self.recorder.all_trees(),
                };
                return Err(FlowError(format!(
                    "expected a {} matching the predicate within {timeout:?}, but none arrived\n{arrived}",
                    E::NAME
                )));
            }
            let _ = tokio::time::timeout(left, changed.changed()).await;
        }
    }
}

impl<E: Event> Wait<'_, E, Absent> {
    /// Watches for `window` (failing as soon as one arrives).
    ///
    /// # Errors
    /// A matching event arrived; the message shows its flow.
    pub async fn during(self, window: Duration) -> Result<(), FlowError> {
        let deadline = Instant::now() + window;
        let mut changed = self.recorder.shared.count.subscribe();
        let mut cursor = 0;
        loop {
            changed.borrow_and_update();
            if let Some((_, r)) = self.next_match(&mut cursor) {
                let flow = self.recorder.flow(r.meta.correlation_id());
                return Err(FlowError(format!(
                    "expected no {} within {window:?}, but {} arrived from {}\n{}",
                    E::NAME,
                    r.meta.id().short(),
                    r.meta.source(),
                    flow.tree()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let _ = tokio::time::timeout(left, changed.changed()).await;
        }
    }
}

/// The events of one flow (one correlation id), with their causation links.
#[derive(Clone, Debug)]
pub struct Flow {
    correlation: EventId,
    /// Distinct events by id (first recorded copy), sorted by `ce-time`.
    events: Vec<Recorded>,
    /// Ids recorded more than once (stored twice in the streams), but for
    /// copies a replay stored again.
    duplicates: Vec<EventId>,
    /// Ids of the copies a replay stored again (`choreo-replay`), one entry
    /// per copy.
    replayed: Vec<EventId>,
}

impl Flow {
    fn new(correlation: EventId, all: Vec<Recorded>) -> Self {
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        let mut duplicates = Vec::new();
        let mut replayed = Vec::new();
        for r in all
            .into_iter()
            .filter(|r| r.meta.correlation_id() == correlation)
        {
            if seen.insert(r.meta.id()) {
                events.push(r);
            } else if r.replay.is_some() {
                replayed.push(r.meta.id());
            } else {
                duplicates.push(r.meta.id());
            }
        }
        events.sort_by_key(|r| r.meta.time());
        Self {
            correlation,
            events,
            duplicates,
            replayed,
        }
    }

    /// The correlation id.
    pub fn correlation_id(&self) -> EventId {
        self.correlation
    }

    /// The distinct events, by emission time.
    pub fn events(&self) -> &[Recorded] {
        &self.events
    }

    /// The number of distinct events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing of this flow was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// How many events of type `E` the flow has.
    pub fn count<E: Event>(&self) -> usize {
        self.events
            .iter()
            .filter(|r| r.meta.event_type() == E::NAME)
            .count()
    }

    /// Every root-to-leaf chain of event types along causation links.
    pub fn paths(&self) -> Vec<Vec<String>> {
        let children = self.children();
        let mut out = Vec::new();
        for root in self.roots() {
            let mut stack = vec![(root, vec![self.events[root].meta.event_type().to_owned()])];
            while let Some((i, path)) = stack.pop() {
                let kids = children
                    .get(&self.events[i].meta.id())
                    .cloned()
                    .unwrap_or_default();
                if kids.is_empty() {
                    out.push(path);
                } else {
                    for k in kids.into_iter().rev() {
                        let mut p = path.clone();
                        p.push(self.events[k].meta.event_type().to_owned());
                        stack.push((k, p));
                    }
                }
            }
        }
        out
    }

    /// Asserts that some root-to-leaf chain is exactly `path`.
    ///
    /// # Errors
    /// No chain matches; the message lists the chains and shows the tree.
    pub fn assert_path(&self, path: &[&str]) -> Result<(), FlowError> {
        let paths = self.paths();
        if paths
            .iter()
            .any(|p| p.iter().map(String::as_str).eq(path.iter().copied()))
        {
            return Ok(());
        }
        let have: Vec<String> = paths.iter().map(|p| p.join(" → ")).collect();
        Err(self.fail(&format!(
            "expected the path {}, but the flow's paths are: {}",
            path.join(" → "),
            if have.is_empty() {
                "(none)".to_owned()
            } else {
                have.join("; ")
            }
        )))
    }

    /// Asserts that every `Effect` in the flow was emitted while handling a `Cause`.
    ///
    /// # Errors
    /// An `Effect` has another cause, or there is no `Effect` at all.
    pub fn assert_caused_by<Effect: Event, Cause: Event>(&self) -> Result<(), FlowError> {
        let by_id: HashMap<EventId, &Recorded> =
            self.events.iter().map(|r| (r.meta.id(), r)).collect();
        let effects: Vec<&Recorded> = self
            .events
            .iter()
            .filter(|r| r.meta.event_type() == Effect::NAME)
            .collect();
        if effects.is_empty() {
            return Err(self.fail(&format!(
                "expected {} caused by {}, but the flow has no {}",
                Effect::NAME,
                Cause::NAME,
                Effect::NAME
            )));
        }
        for e in effects {
            let cause = e.meta.causation_id().and_then(|c| by_id.get(&c));
            if cause.map(|c| c.meta.event_type()) != Some(Cause::NAME) {
                return Err(self.fail(&format!(
                    "expected every {} to be caused by a {}, but {} was caused by {}",
                    Effect::NAME,
                    Cause::NAME,
                    e.meta.id().short(),
                    cause.map_or_else(
                        || "nothing recorded in this flow".to_owned(),
                        |c| format!("{} {}", c.meta.event_type(), c.meta.id().short())
                    )
                )));
            }
        }
        Ok(())
    }

    /// Asserts that the flow has exactly `n` events of type `E`.
    ///
    /// # Errors
    /// Another count.
    pub fn assert_count<E: Event>(&self, n: usize) -> Result<(), FlowError> {
        let got = self.count::<E>();
        if got == n {
            Ok(())
        } else {
            Err(self.fail(&format!("expected {n} {}, found {got}", E::NAME)))
        }
    }

    /// The ids of the copies a replay stored again (`choreo dlq replay`,
    /// or a handler's emissions while `choreo replay` rewound it, past the
    /// stream's duplicate window): one entry per copy. These are not
    /// duplicates; [`Self::assert_no_duplicates`] lets them be.
    pub fn replayed_copies(&self) -> &[EventId] {
        &self.replayed
    }

    /// Asserts that no event id was stored more than once, but for copies a
    /// replay stored again and says so (its `choreo-replay` header; see
    /// [`Self::replayed_copies`]).
    ///
    /// # Errors
    /// Some id appears twice in the streams without a replay's mark.
    pub fn assert_no_duplicates(&self) -> Result<(), FlowError> {
        if self.duplicates.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = self.duplicates.iter().map(EventId::short).collect();
        Err(self.fail(&format!(
            "expected no duplicate event ids, but these were stored more than once: {}",
            ids.join(", ")
        )))
    }

    fn fail(&self, what: &str) -> FlowError {
        FlowError(format!("{what}\n{}", self.tree()))
    }

    fn roots(&self) -> Vec<usize> {
        let ids: HashSet<EventId> = self.events.iter().map(|r| r.meta.id()).collect();
        (0..self.events.len())
            .filter(|&i| {
                self.events[i]
                    .meta
                    .causation_id()
                    .is_none_or(|c| !ids.contains(&c))
            })
            .collect()
    }

    fn children(&self) -> HashMap<EventId, Vec<usize>> {
        let mut map: HashMap<EventId, Vec<usize>> = HashMap::new();
        for (i, r) in self.events.iter().enumerate() {
            if let Some(c) = r.meta.causation_id() {
                map.entry(c).or_default().push(i);
            }
        }
        map
    }

    /// The flow as an indented causation tree: event type, emitting service,
    /// short id, and time since the first event.
    ///
    /// ```text
    /// flow e4793154: 3 events
    /// OrderPlaced [checkout] e4793154 +0ms
    /// └─ PaymentCaptured [payments] 2bf486da +2ms
    ///    └─ OrderShipped [shipping] 0c5e11d2 +4ms
    /// ```
    pub fn tree(&self) -> String {
        let mut out = format!(
            "flow {}: {}",
            self.correlation.short(),
            plural(self.events.len(), "event", "events")
        );
        if !self.duplicates.is_empty() {
            let _ = write!(
                out,
                ", {}",
                plural(self.duplicates.len(), "duplicate copy", "duplicate copies")
            );
        }
        if !self.replayed.is_empty() {
            let _ = write!(
                out,
                ", {}",
                plural(self.replayed.len(), "replayed copy", "replayed copies")
            );
        }
        out.push('\n');
        if self.events.is_empty() {
            out.push_str("(nothing recorded for this correlation id)\n");
            return out;
        }
        let mut w = TreeWriter {
            flow: self,
            children: self.children(),
            t0: self.events[0].meta.time(),
            out,
        };
        for root in self.roots() {
            w.walk(root, "", None);
        }
        w.out
    }

    /// The flow as a Mermaid sequence diagram between services. Each arrow
    /// starts at the service that emitted the event it is labelled with and
    /// ends at each service that reacted to it (emitted an event it caused);
    /// an event nobody in the flow reacted to is a note over its emitter.
    ///
    /// ```text
    /// sequenceDiagram
    ///     participant checkout
    ///     participant payments
    ///     checkout->>payments: OrderPlaced
    ///     Note over payments: PaymentCaptured
    /// ```
    pub fn mermaid(&self) -> String {
        let children = self.children();
        let arrows: Vec<choreo::__private::Arrow<'_>> = self
            .events
            .iter()
            .map(|r| {
                let mut to: Vec<(&str, Option<String>)> = Vec::new();
                for &k in children.get(&r.meta.id()).map_or(&[][..], Vec::as_slice) {
                    let s = self.events[k].meta.source();
                    if !to.iter().any(|t| t.0 == s) {
                        to.push((s, None));
                    }
                }
                choreo::__private::Arrow {
                    source: r.meta.source(),
                    event_type: r.meta.event_type(),
                    to,
                }
            })
            .collect();
        choreo::__private::sequence_diagram(&arrows)
    }
}

/// `1 event`, `2 events`.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Writes a causation tree, one line per event.
struct TreeWriter<'f> {
    flow: &'f Flow,
    children: HashMap<EventId, Vec<usize>>,
    t0: time::OffsetDateTime,
    out: String,
}

impl TreeWriter<'_> {
    /// Writes event `i` and its descendants. `last` is `None` for a root, else
    /// whether it is its parent's last child.
    fn walk(&mut self, i: usize, prefix: &str, last: Option<bool>) {
        let r = &self.flow.events[i];
        let ms = (r.meta.time() - self.t0).whole_milliseconds();
        let branch = match last {
            None => "",
            Some(true) => "└─ ",
            Some(false) => "├─ ",
        };
        let _ = writeln!(
            self.out,
            "{prefix}{branch}{} [{}] {} +{ms}ms",
            r.meta.event_type(),
            r.meta.source(),
            r.meta.id().short()
        );
        let kids = self.children.get(&r.meta.id()).cloned().unwrap_or_default();
        let next = match last {
            None => prefix.to_owned(),
            Some(true) => format!("{prefix}   "),
            Some(false) => format!("{prefix}│  "),
        };
        for (n, k) in kids.iter().enumerate() {
            self.walk(*k, &next, Some(n + 1 == kids.len()));
        }
    }
}
