//! [`Aggregates`]: load a state from its history, decide on it, append what
//! the decision returns guarded by the last sequence read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use super::Aggregate;
use super::cache::{Cache, DEFAULT_CACHE_CAPACITY, Turns};
use super::error::{AggregateError, DecideError};
use super::fold::{Capture, Cause, Fold, decode};
use super::parts::Parts;
use super::read::{self, Until};
use super::snapshot::{SnapshotPolicy, Snapshots};
use crate::event::EventId;
use crate::nats::LazyAnswers;
use crate::publish::Publisher;
use crate::wire::headers::Metadata;

/// How many times [`Aggregates::decide`] loads and decides before it
/// returns [`DecideError::Conflict`] by default.
pub const DEFAULT_ATTEMPTS: u32 = 10;

/// Loads aggregates and decides on them, appending through a
/// [`Publisher`] (its connection, JetStream API, `ce-source` and stream
/// settings).
///
/// ```no_run
/// # use choreo::{event, Aggregate, AggregateEvent, Aggregates, Publisher};
/// # #[event(subject = "stock.{sku}.received")]
/// # pub struct StockReceived { pub sku: String, pub qty: u32 }
/// # #[event(subject = "stock.{sku}.reserved")]
/// # pub struct StockReserved { pub sku: String, pub qty: u32 }
/// # #[derive(AggregateEvent)]
/// # pub enum StockEvent { Received(StockReceived), Reserved(StockReserved) }
/// # #[derive(Default, Clone)]
/// # pub struct Stock { pub on_hand: u32 }
/// # impl Aggregate for Stock {
/// #     const NAME: &'static str = "Stock";
/// #     type Event = StockEvent;
/// #     fn filter(sku: &str) -> String { format!("stock.{sku}.*") }
/// #     fn apply(&mut self, e: &StockEvent) {
/// #         match e { StockEvent::Received(e) => self.on_hand += e.qty, StockEvent::Reserved(e) => self.on_hand -= e.qty }
/// #     }
/// # }
/// # async fn t(client: choreo::async_nats::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let stock = Aggregates::new(Publisher::new(client, "inventory")?);
/// let decided = stock
///     .decide::<Stock, _, _>("sku-1", |s| {
///         if s.on_hand < 2 {
///             return Err("out of stock");
///         }
///         Ok(vec![StockEvent::Reserved(StockReserved { sku: "sku-1".into(), qty: 2 })])
///     })
///     .await?;
/// println!("{} left at sequence {}", decided.state.on_hand, decided.version);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Aggregates {
    pub(super) publisher: Publisher,
    pub(super) attempts: u32,
    snapshots: Option<SnapshotPolicy>,
    bucket: Snapshots,
    pub(super) cache: Cache,
    pub(super) turns: Turns,
    /// The streams set up for aggregates so far.
    pub(super) prepared: Arc<Mutex<HashSet<&'static str>>>,
    /// Where loads' answers arrive: one subscription for every load.
    pub(super) answers: LazyAnswers,
}

/// A state as loaded.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Loaded<A> {
    /// The fold of the events read.
    pub state: A,
    /// The stream sequence of the last event read (0: none): what a
    /// decision on this state expects to still be the last.
    pub version: u64,
    /// How many events were folded, a snapshot's among them.
    pub events: u64,
    /// How many of them this load read from the stream (the others came
    /// from a snapshot).
    pub read: u64,
}

/// A point in an aggregate's history, for [`Aggregates::load_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// Up to and with this stream sequence.
    Sequence(u64),
    /// Up to and with this time (the server's, when each event was stored).
    Time(OffsetDateTime),
}

/// One stored event of an aggregate.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Recorded<E> {
    /// The event.
    pub event: E,
    /// Its metadata (id, type, source, time, flow).
    pub meta: Metadata,
    /// The subject it was stored on.
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// When the server stored it.
    pub stored_at: OffsetDateTime,
}

/// One event a decision appended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The event's id.
    pub event_id: EventId,
    /// The subject it was stored on.
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
}

/// What a decision did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Decided<A> {
    /// The state after the appended events.
    pub state: A,
    /// The stream sequence of the state's last event.
    pub version: u64,
    /// What was appended, in order (empty when the decision returned no
    /// events).
    pub appended: Vec<Appended>,
    /// The decision was appended by an earlier delivery of the handled
    /// event (found in the history), so it did not run again.
    pub earlier: bool,
    /// How many times it loaded and decided (1: no conflict).
    pub attempts: u32,
}

/// How a decision's events get their metadata.
pub(crate) enum Flow<'a> {
    /// Roots: the first event starts a flow, the others follow it.
    Root,
    /// Caused by a handled event, with ids derived from `ns` (the handler
    /// and the decision) and the cause, written by `source` (the service).
    Caused {
        cause: &'a Metadata,
        ns: String,
        source: &'a str,
    },
}

impl Aggregates {
    /// Decides through `publisher`, [`DEFAULT_ATTEMPTS`] attempts per
    /// decision.
    pub fn new(publisher: Publisher) -> Self {
        Self {
            publisher,
            attempts: DEFAULT_ATTEMPTS,
            snapshots: None,
            bucket: Snapshots::default(),
            cache: Cache::new(DEFAULT_CACHE_CAPACITY),
            turns: Turns::default(),
            prepared: Arc::new(Mutex::new(HashSet::new())),
            answers: LazyAnswers::default(),
        }
    }

    /// How many times a decision loads and decides before it gives up on
    /// conflicts (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Writes snapshots of the aggregates that have them
    /// ([`Aggregate::snapshot`]) as `policy` says, and loads from them
    /// (`docs/aggregates.md#snapshots`). Off by default.
    pub fn snapshots(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = Some(policy);
        self
    }

    /// How many states it keeps in memory (default
    /// [`DEFAULT_CACHE_CAPACITY`]; 0: none), so a decision on an aggregate
    /// loaded before reads only the events appended since. Each costs its
    /// state's size and the caused events it folded in the last hour.
    pub fn cache(mut self, capacity: usize) -> Self {
        self.cache = Cache::new(capacity);
        self
    }

    /// The publisher it appends through.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Loads instance `id` of `A`: every event on `A::filter(id)`, folded.
    ///
    /// # Errors
    /// See [`AggregateError`].
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, AggregateError> {
        let mut fold = self.open::<A>(id, None).await?;
        Ok(fold.loaded())
    }

    /// Loads instance `id`: from memory or its snapshot when there is one,
    /// then the events after it; writes a new snapshot when the policy says
    /// so.
    pub(super) async fn open<A: Aggregate>(
        &self,
        id: &str,
        cause: Option<Cause>,
    ) -> Result<Fold<A>, AggregateError> {
        let started = std::time::Instant::now();
        let mut fold = Fold::<A>::new(&A::filter(id), cause);
        let replicas = self.publisher.settings().replicas;
        let cause_key = fold.cause.as_ref().map(|c| (c.id, c.source.as_str()));
        if let Some((entry, earlier)) = self.cache.get::<A>(id, cause_key) {
            fold.resume(entry, earlier);
        } else if let Some(policy) = self.snapshots {
            // Boxed: a key-value read's future is large, and a load without
            // snapshots would carry it too.
            if let Some(r) =
                Box::pin(self.bucket.read::<A>(self.publisher.js(), replicas, id)).await
            {
                fold.state = r.state;
                fold.version = r.version;
                fold.events = r.events;
            }
            fold.capture = Some(Capture {
                policy,
                cutoff: OffsetDateTime::now_utc() - policy.lag,
                started,
                since: 0,
                taken: None,
                done: false,
            });
        }
        self.read::<A>(id, &mut fold, Until::default()).await?;
        if let Some(mut capture) = fold.capture.take() {
            // Every event read is older than the lag: the whole state may
            // go into the snapshot.
            if !capture.done {
                capture.consider(&fold.state, fold.version, fold.events);
            }
            if let Some(taken) = capture.taken {
                self.bucket
                    .write::<A>(self.publisher.js(), replicas, id, taken);
            }
        }
        let (entry, recent) = fold.entry();
        self.cache.put(id, entry, recent);
        Ok(fold)
    }

    /// For a decision: resumes `fold` (new, with its cause) from instance
    /// `id`'s state in memory, used unread when its last decision met no
    /// conflict (the append's check tells whether anyone appended since;
    /// [`Fold::fresh`] is false); false, `fold` untouched, when there is
    /// none to trust. No wait, so no future to box on the hot path.
    pub(super) fn open_in_memory<A: Aggregate>(&self, id: &str, fold: &mut Fold<A>) -> bool {
        let cause_key = fold.cause.as_ref().map(|c| (c.id, c.source.as_str()));
        match self.cache.get::<A>(id, cause_key) {
            Some((entry, earlier)) if !entry.contended => {
                fold.resume(entry, earlier);
                fold.fresh = false;
                true
            }
            _ => false,
        }
    }

    /// The state of instance `id` as of `at`: the events stored up to that
    /// sequence or time, folded.
    ///
    /// # Errors
    /// See [`AggregateError`].
    pub async fn load_at<A: Aggregate>(
        &self,
        id: &str,
        at: At,
    ) -> Result<Loaded<A>, AggregateError> {
        let mut fold = Fold::<A>::new(&A::filter(id), None);
        self.read::<A>(id, &mut fold, Until::from(at)).await?;
        Ok(fold.loaded())
    }

    /// The events of instance `id`, up to `at` (all without).
    ///
    /// # Errors
    /// See [`AggregateError`].
    pub async fn history<A: Aggregate>(
        &self,
        id: &str,
        at: Option<At>,
    ) -> Result<Vec<Recorded<A::Event>>, AggregateError> {
        let stream = self.prepare::<A>(id).await?;
        let filter = A::filter(id);
        let mut out = Vec::new();
        read::read(
            (self.publisher.client(), &self.answers),
            (self.publisher.api_prefix(), stream),
            (A::NAME, id, &filter),
            0,
            at.map(Until::from).unwrap_or_default(),
            |raw| {
                let (event, meta) = decode::<A>(id, &raw)?;
                out.push(Recorded {
                    event,
                    meta,
                    subject: raw.subject,
                    sequence: raw.sequence,
                    stored_at: raw.stored_at,
                });
                Ok(())
            },
        )
        .await?;
        Ok(out)
    }

    /// Loads instance `id` of `A`, runs `decide` on its state and appends
    /// the events it returns, as roots of one new flow (the first event's
    /// id is their correlation id), if nobody appended to the instance
    /// since it was loaded. On a conflict it loads and decides again, up to
    /// [`attempts`](Self::attempts) times in all.
    ///
    /// # Errors
    /// [`DecideError::Refused`] with `decide`'s error (nothing appended),
    /// [`DecideError::Conflict`] after the last attempt, or
    /// [`DecideError::Failed`].
    pub async fn decide<A, F, E>(&self, id: &str, decide: F) -> Result<Decided<A>, DecideError<E>>
    where
        A: Aggregate,
        F: FnMut(&A) -> Result<Vec<A::Event>, E>,
    {
        self.decide_in(id, &Flow::Root, decide).await
    }

    #[tracing::instrument(
        name = "choreo.decide",
        skip_all,
        fields(choreo.aggregate = A::NAME, choreo.aggregate_id = %id)
    )]
    pub(crate) async fn decide_in<A, F, E>(
        &self,
        id: &str,
        flow: &Flow<'_>,
        mut decide: F,
    ) -> Result<Decided<A>, DecideError<E>>
    where
        A: Aggregate,
        F: FnMut(&A) -> Result<Vec<A::Event>, E>,
    {
        let mut parts = Parts::new();
        parts.push::<A>(id);
        let run = self
            .run(&mut parts, flow, |parts| {
                let events =
                    decide(&parts.slot::<A>(0).fold.state).map_err(DecideError::Refused)?;
                parts.stage::<A>(0, events);
                Ok(())
            })
            .await?;
        let fold = &mut parts.slot_mut::<A>(0).fold;
        Ok(fold.decided(run.appended, run.earlier, run.attempts))
    }

    /// Reads the events after `fold`'s version into it.
    async fn read<A: Aggregate>(
        &self,
        id: &str,
        fold: &mut Fold<A>,
        until: Until,
    ) -> Result<(), AggregateError> {
        let stream = self.prepare::<A>(id).await?;
        let filter = fold.filter.clone();
        read::read(
            (self.publisher.client(), &self.answers),
            (self.publisher.api_prefix(), stream),
            (A::NAME, id, &filter),
            fold.version,
            until,
            |raw| fold.take(id, raw),
        )
        .await?;
        Ok(())
    }
}
