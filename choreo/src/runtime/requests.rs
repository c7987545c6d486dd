//! Pull requests for one handler, sized to its free permits, so no event
//! waits unwatched in the client.
//!
//! A handler runs `concurrency` events at once and may hold a quarter more
//! ([`headroom`]), each waiting for its turn in a task of its own, watched
//! by the watchdog. Before asking the server for `n` events, the pull loop
//! takes `n` permits; each event that arrives brings its permit into the
//! task that runs it, and a request that ends with fewer events than asked
//! (it expired, the server said why) gives the rest back. So every event
//! this instance has pulled is running or waiting for its turn, watched —
//! nothing sits in a prefetch buffer counting down its `ack_wait`, and
//! graceful shutdown has nothing to hand back (a nak would spend a delivery
//! attempt).
//!
//! All requests of one handler share one reply subscription, as async-nats'
//! own pull stream does. On shutdown it is drained: the server stops sending
//! once it sees the unsubscribe, and what it sent before arrives and runs.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use async_nats::{StatusCode, Subject};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A pull request through a pinned priority group, with the pin held.
#[derive(serde::Serialize)]
struct GroupRequest<'a> {
    batch: usize,
    expires: u64,
    idle_heartbeat: u64,
    group: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// A partition's requests wait for a quarter of its window to be free.
const PINNED_TOP_UP: usize = 4;

/// How many events a handler of `concurrency` may pull beyond those it
/// runs: a quarter more. Each waits for a turn to run in its own task,
/// registered with the watchdog from the moment its inbox look-up is done,
/// so its in-progress acks are sent while it waits; at shutdown it runs
/// like the others (none is handed back, so none spends a delivery
/// attempt).
pub(crate) fn headroom(concurrency: usize) -> usize {
    concurrency / 4
}

/// How long one pull request waits at the server for events.
pub(crate) const EXPIRES: Duration = Duration::from_secs(10);
/// How often the server says it is alive while a request waits.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which outstanding requests are taken to be gone (their
/// consumer's leader moved, the connection was re-established).
const SILENCE: Duration = Duration::from_secs(5);

/// A pending wait for enough free permits to send a request (one per
/// request sent, not per event).
pub(crate) type PermitWait =
    std::pin::Pin<Box<dyn std::future::Future<Output = OwnedSemaphorePermit> + Send>>;

/// A permit of the handler's concurrency, held by the task that runs one
/// event (or by a pull request, for an event not yet arrived).
pub(crate) type Slot = Option<OwnedSemaphorePermit>;

/// What one read from the reply subscription brought.
// Events are the common case by far: boxing them would cost an allocation
// per event to make the rare variants smaller.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    /// An event, with the permit its request reserved for it.
    Event(jetstream::Message, Slot),
    /// A status (heartbeat, a request's end) was accounted for.
    Status,
    /// The consumer is gone: get it again, or recreate it.
    ConsumerGone(String),
    /// The subscription ended (after a drain, or the connection closed).
    Ended,
    /// A pinned group's server says another client holds the pin now
    /// (423): this one's requests are void.
    Unpinned,
}

/// How requests name a pinned priority group: the consumer's next-message
/// subject, the group, and the pin this client holds (sent as `id`).
pub(crate) struct Pinned {
    pub(crate) next_subject: String,
    pub(crate) group: &'static str,
    pub(crate) pin: Option<String>,
}

/// Pull requests of one handler and the permits they hold.
pub(crate) struct Puller {
    js: jetstream::Context,
    consumer: jetstream::consumer::PullConsumer,
    permits: Arc<Semaphore>,
    /// Most events one request asks for.
    max_request: usize,
    inbox: Subject,
    sub: async_nats::Subscriber,
    /// Permits reserved for events requested and not yet arrived.
    reserved: Vec<OwnedSemaphorePermit>,
    last_heard: Instant,
    /// Since when the consumer could not be recreated.
    pub(crate) trouble_since: Option<Instant>,
    /// For an ordered handler's partition: its pinned group.
    pub(crate) pinned: Option<Pinned>,
    /// How long a request waits at the server.
    expires: Duration,
}

impl Puller {
    pub(crate) async fn new(
        js: jetstream::Context,
        consumer: jetstream::consumer::PullConsumer,
        permits: Arc<Semaphore>,
        max_request: usize,
    ) -> Result<Self, async_nats::SubscribeError> {
        let client = js.client();
        let inbox: Subject = client.new_inbox().into();
        let sub = client.subscribe(inbox.clone()).await?;
        Ok(Self {
            js,
            consumer,
            permits,
            max_request: max_request.max(1),
            inbox,
            sub,
            reserved: Vec::new(),
            last_heard: Instant::now(),
            trouble_since: None,
            pinned: None,
            expires: EXPIRES,
        })
    }

    /// A new subscription for the same consumer and permits (after the
    /// last one ended), pulling the same way; a pinned group's pin is not
    /// carried over.
    pub(crate) async fn again(&self) -> Result<Self, async_nats::SubscribeError> {
        let mut p = Self::new(
            self.js.clone(),
            self.consumer.clone(),
            self.permits.clone(),
            self.max_request,
        )
        .await?;
        p.expires = self.expires;
        p.pinned = self.pinned.as_ref().map(|old| Pinned {
            next_subject: old.next_subject.clone(),
            group: old.group,
            pin: None,
        });
        Ok(p)
    }

    /// Pulls through a pinned priority group, each request waiting at most
    /// `expires` (below the group's pin timeout, so a holder that keeps
    /// asking keeps its pin).
    pub(crate) fn pinned(mut self, pinned: Pinned, expires: Duration) -> Self {
        self.pinned = Some(pinned);
        self.expires = expires;
        self
    }

    /// Replaces the consumer (after it was recreated); outstanding requests
    /// died with the old one.
    pub(crate) fn set_consumer(&mut self, consumer: jetstream::consumer::PullConsumer) {
        self.consumer = consumer;
        self.forget_requests();
    }

    /// The consumer requests go to.
    pub(crate) fn consumer(&self) -> &jetstream::consumer::PullConsumer {
        &self.consumer
    }

    /// How many free permits make a new request worth sending: one when
    /// nothing is outstanding (always keep a request open), else a quarter
    /// of a full request (64 of 256). The handler may pull a quarter more
    /// events than it runs at once ([`headroom`]), so a request of a
    /// quarter keeps the server supplied while the last one's events wait
    /// their turns. Measured on the 1-hop inbox-off handler against the
    /// raw relay, pairs alternated in one session (`bench --only handler
    /// --repeat 5`, three rounds): without headroom, asking at every
    /// thirty-second: 0.83, 0.88, 0.80 (0.09 pull requests per event); with
    /// it, at every quarter: 0.86, 0.92, 0.88 (0.005 per event). Without
    /// headroom, waiting for half a request left the server without demand
    /// between requests (0.85–0.89).
    pub(crate) fn threshold(&self) -> usize {
        if self.reserved.is_empty() {
            1
        } else if self.pinned.is_some() {
            // A partition's window is small (64): asking for every two free
            // permits floods the server with requests, one per partition.
            (self.max_request / PINNED_TOP_UP).max(1)
        } else {
            (self.max_request / 4).max(1)
        }
    }

    /// Waits until enough permits are free for a new request and takes
    /// them. Cancel-safe; give the permits to [`send`](Self::send).
    pub(crate) fn wait_for_permits(&self) -> PermitWait {
        let want = u32::try_from(self.threshold()).unwrap_or(u32::MAX);
        let permits = self.permits.clone();
        Box::pin(async move {
            match permits.acquire_many_owned(want).await {
                Ok(p) => p,
                // The semaphore is never closed; wait rather than spin.
                Err(_) => std::future::pending().await,
            }
        })
    }

    /// Sends a request for the permits `first` holds, plus any others free
    /// (up to a full request), reserving them for the events it brings. On
    /// error the permits are given back.
    pub(crate) async fn send(
        &mut self,
        first: OwnedSemaphorePermit,
    ) -> Result<(), pull::BatchRequestError> {
        let mut taken = vec![first];
        let have = self.reserved.len() + taken[0].num_permits();
        let room = self.max_request.saturating_sub(have);
        let extra = self.permits.available_permits().min(room);
        if extra > 0
            && let Ok(p) = self
                .permits
                .clone()
                .try_acquire_many_owned(u32::try_from(extra).unwrap_or(u32::MAX))
        {
            taken.push(p);
        }
        let n: usize = taken.iter().map(OwnedSemaphorePermit::num_permits).sum();
        let heartbeat = HEARTBEAT.min(self.expires / 2);
        if let Some(p) = &self.pinned {
            let request = GroupRequest {
                batch: n,
                expires: u64::try_from(self.expires.as_nanos()).unwrap_or(u64::MAX),
                idle_heartbeat: u64::try_from(heartbeat.as_nanos()).unwrap_or(u64::MAX),
                group: p.group,
                id: p.pin.as_deref(),
            };
            let body = serde_json::to_vec(&request).map_err(|e| {
                pull::BatchRequestError::with_source(pull::BatchRequestErrorKind::Serialize, e)
            })?;
            self.js
                .client()
                .publish_with_reply(p.next_subject.clone(), self.inbox.clone(), body.into())
                .await
                .map_err(|e| {
                    pull::BatchRequestError::with_source(pull::BatchRequestErrorKind::Publish, e)
                })?;
        } else {
            self.consumer
                .request_batch(
                    pull::BatchConfig {
                        batch: n,
                        expires: Some(self.expires),
                        idle_heartbeat: heartbeat,
                        ..Default::default()
                    },
                    self.inbox.clone(),
                )
                .await?;
        }
        if self.reserved.is_empty() {
            // Silence is measured from the first request that waits.
            self.last_heard = Instant::now();
        }
        for mut p in taken {
            while p.num_permits() > 1 {
                if let Some(one) = p.split(1) {
                    self.reserved.push(one);
                }
            }
            self.reserved.push(p);
        }
        Ok(())
    }

    /// Whether outstanding requests have been silent for too long: no event
    /// and no heartbeat. They are then forgotten and their permits freed.
    pub(crate) fn check_silence(&mut self) -> bool {
        if !self.reserved.is_empty() && self.last_heard.elapsed() > SILENCE {
            self.forget_requests();
            return true;
        }
        false
    }

    /// Events requested and not arrived yet.
    pub(crate) fn outstanding(&self) -> usize {
        self.reserved.len()
    }

    /// Forgets the outstanding requests (their pin was let go), freeing
    /// their permits.
    pub(crate) fn forget(&mut self) {
        self.forget_requests();
    }

    fn forget_requests(&mut self) {
        self.reserved.clear();
    }

    /// The next message on the reply subscription, waiting for it.
    pub(crate) async fn next(&mut self) -> Pulled {
        match self.sub.next().await {
            Some(msg) => self.account(msg),
            None => Pulled::Ended,
        }
    }

    /// The next message if one is already here.
    pub(crate) fn next_now(&mut self) -> Option<Pulled> {
        use futures::FutureExt;
        match self.sub.next().now_or_never()? {
            Some(msg) => Some(self.account(msg)),
            None => Some(Pulled::Ended),
        }
    }

    fn account(&mut self, msg: async_nats::Message) -> Pulled {
        self.last_heard = Instant::now();
        let status = msg.status.unwrap_or(StatusCode::OK);
        if status == StatusCode::OK {
            // An event without a reservation comes from a request already
            // forgotten (after a silence): it runs with a permit if one is
            // free, or beyond the limit, rather than being handed back.
            let slot = self
                .reserved
                .pop()
                .or_else(|| self.permits.clone().try_acquire_owned().ok());
            return Pulled::Event(
                jetstream::Message {
                    message: msg,
                    context: self.js.clone(),
                },
                slot,
            );
        }
        if status == StatusCode::IDLE_HEARTBEAT {
            return Pulled::Status;
        }
        if status == StatusCode::PIN_ID_MISMATCH {
            self.forget_requests();
            return Pulled::Unpinned;
        }
        let description = msg.description.clone().unwrap_or_default();
        if description.eq_ignore_ascii_case("consumer deleted") {
            self.forget_requests();
            return Pulled::ConsumerGone(description);
        }
        if status == StatusCode::NO_RESPONDERS {
            // The request reached no server: nothing is outstanding for it.
            self.forget_requests();
            return Pulled::ConsumerGone("no responders".to_owned());
        }
        // A request ended (expired, completed, a leadership change, a
        // limit): it says how many of its events will not come.
        let unfilled = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Pending-Messages"))
            .and_then(|v| v.as_str().parse::<usize>().ok());
        match unfilled {
            Some(n) => {
                let keep = self.reserved.len().saturating_sub(n);
                self.reserved.truncate(keep);
            }
            None => {
                tracing::debug!(%status, %description, "pull request ended without a count; forgetting outstanding requests");
                self.forget_requests();
            }
        }
        Pulled::Status
    }

    /// Unsubscribes, keeping what the server already sent: read on until
    /// [`Pulled::Ended`].
    pub(crate) async fn drain(&mut self) {
        if let Err(e) = self.sub.drain().await {
            tracing::debug!(error = %e, "draining the pull subscription failed");
        }
    }
}
