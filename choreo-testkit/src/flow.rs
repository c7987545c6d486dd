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
use choreo::{Event, EventId, Metadata};
use futures::StreamExt;
use tokio::sync::Notify;
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
}

/// A flow assertion failed. Its message says what was expected and shows the
/// causation tree of what arrived.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FlowError(String);

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

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<Recorded>>,
    changed: Notify,
}

/// Records choreo events from JetStream streams. Stops when dropped.
pub struct Recorder {
    shared: Arc<Shared>,
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
/// recorded), advisories and key-value buckets.
fn is_infrastructure(stream: &str) -> bool {
    stream == choreo::dlq::DLQ_STREAM
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
        Self::launch(client, None).await
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
        )
        .await
    }

    async fn launch(
        client: &async_nats::Client,
        only: Option<HashSet<String>>,
    ) -> Result<Self, TestkitError> {
        let js = jetstream::new(client.clone());
        js.query_account()
            .await
            .map_err(|e| TestkitError::Connect {
                url: "(recorder)".into(),
                reason: e.to_string(),
            })?;
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        let watcher_shared = shared.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(watch_streams(js, only, watcher_shared, ready_tx));
        // The first scan attaches to the streams that exist now.
        let _ = ready_rx.await;
        Ok(Self {
            shared,
            _tasks: tasks,
        })
    }

    /// Every event recorded so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Recorded> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        Flow::new(correlation, self.snapshot())
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
        let mut count = usize::MAX;
        let mut since = Instant::now();
        loop {
            let flow = self.flow(correlation);
            if flow.len() != count {
                count = flow.len();
                since = Instant::now();
            }
            if count > 0 && since.elapsed() >= quiet {
                return Ok(flow);
            }
            if Instant::now() >= deadline {
                return Err(FlowError(format!(
                    "flow {} did not go quiet for {quiet:?} within {within:?}\n{}",
                    correlation.short(),
                    flow.tree()
                )));
            }
            let wake = (since + quiet)
                .min(deadline)
                .saturating_duration_since(Instant::now());
            self.wait_change(wake.max(Duration::from_millis(5))).await;
        }
    }

    async fn wait_change(&self, at_most: Duration) {
        let notified = self.shared.changed.notified();
        let _ = tokio::time::timeout(at_most, notified).await;
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
            "what arrived ({} flows{}):\n",
            corrs.len(),
            if shown < corrs.len() {
                ", last 10 shown"
            } else {
                ""
            }
        );
        for c in &corrs[corrs.len() - shown..] {
            out.push_str(&Flow::new(*c, events.clone()).tree());
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
    let mut attached: HashSet<String> = HashSet::new();
    let mut readers = JoinSet::new();
    let mut ready = Some(ready);
    loop {
        let mut names = js.stream_names();
        let mut found = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            found.push(name);
        }
        for name in found {
            let wanted = match &only {
                Some(set) => set.contains(&name),
                None => !is_infrastructure(&name),
            };
            if wanted
                && !attached.contains(&name)
                && let Ok(stream) = js.get_stream(&name).await
            {
                let consumer = stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await;
                if let Ok(consumer) = consumer {
                    attached.insert(name.clone());
                    readers.spawn(read_stream(consumer, name, shared.clone()));
                }
            }
        }
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        // New streams are looked for five times a second; their consumers
        // start from the first message, so nothing is missed meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        let Some(headers) = msg.headers.as_ref() else {
            continue;
        };
        let Ok(meta) = Metadata::from_headers(headers) else {
            continue;
        };
        let sequence = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let rec = Recorded {
            meta,
            subject: msg.subject.to_string(),
            stream: stream.clone(),
            sequence,
            payload: msg.payload.clone(),
        };
        shared
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
        shared.changed.notify_waiters();
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

    /// The first recorded event that counts.
    fn first_match(&self) -> Option<(E, Recorded)> {
        self.recorder.snapshot().into_iter().find_map(|r| {
            if self.flow.is_some_and(|c| c != r.meta.correlation_id()) {
                return None;
            }
            let e = decode::<E>(&r)?;
            (self.filter)(&e, &r.meta).then_some((e, r))
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
        loop {
            if let Some((event, r)) = self.first_match() {
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
            self.recorder.wait_change(left).await;
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
        loop {
            if let Some((_, r)) = self.first_match() {
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
            self.recorder.wait_change(left).await;
        }
    }
}

/// The events of one flow (one correlation id), with their causation links.
#[derive(Clone, Debug)]
pub struct Flow {
    correlation: EventId,
    /// Distinct events by id (first recorded copy), sorted by `ce-time`.
    events: Vec<Recorded>,
    /// Ids recorded more than once (stored twice in the streams).
    duplicates: Vec<EventId>,
}

impl Flow {
    fn new(correlation: EventId, all: Vec<Recorded>) -> Self {
        let mut seen = HashSet::new();
        let mut events = Vec::new();
        let mut duplicates = Vec::new();
        for r in all
            .into_iter()
            .filter(|r| r.meta.correlation_id() == correlation)
        {
            if seen.insert(r.meta.id()) {
                events.push(r);
            } else {
                duplicates.push(r.meta.id());
            }
        }
        events.sort_by_key(|r| r.meta.time());
        Self {
            correlation,
            events,
            duplicates,
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

    /// Asserts that no event id was stored more than once.
    ///
    /// # Errors
    /// Some id appears twice in the streams.
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
            "flow {}: {} events",
            self.correlation.short(),
            self.events.len()
        );
        if !self.duplicates.is_empty() {
            let _ = write!(out, ", {} duplicate copies", self.duplicates.len());
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

    /// The flow as a Mermaid sequence diagram between services: a root is a
    /// note over its service; every other event is an arrow from the service
    /// that emitted its cause to the service that emitted it.
    ///
    /// ```text
    /// sequenceDiagram
    ///     participant checkout
    ///     participant payments
    ///     Note over checkout: OrderPlaced
    ///     checkout->>payments: PaymentCaptured
    /// ```
    pub fn mermaid(&self) -> String {
        let by_id: HashMap<EventId, &Recorded> =
            self.events.iter().map(|r| (r.meta.id(), r)).collect();
        let mut out = String::from("sequenceDiagram\n");
        let mut participants: Vec<&str> = Vec::new();
        for r in &self.events {
            if !participants.contains(&r.meta.source()) {
                participants.push(r.meta.source());
            }
        }
        for p in &participants {
            let _ = writeln!(out, "    participant {p}");
        }
        for r in &self.events {
            match r.meta.causation_id().and_then(|c| by_id.get(&c)) {
                Some(cause) => {
                    let _ = writeln!(
                        out,
                        "    {}->>{}: {}",
                        cause.meta.source(),
                        r.meta.source(),
                        r.meta.event_type()
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "    Note over {}: {}",
                        r.meta.source(),
                        r.meta.event_type()
                    );
                }
            }
        }
        out
    }
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
