//! A handler cannot hold an event forever, and no panic escapes: handlers
//! that never return time out and are retried, then dead-lettered with
//! reason `timeout`; panics in extractors, decoding, `From` upcasts and
//! hand-written handlers are caught; a task panicking outside the guard is
//! counted. The service keeps handling other events through all of it.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::__private::FaultPoint;
use choreo::BoxFuture;
use choreo::{
    Context, Envelope, FromContext, Handler, HandlerError, HandlerOptions, Publisher, Service,
    State, event, event_handler,
};
use choreo_testkit::NatsServer;
use common::{dead_letters, eventually, header};

#[event(subject = "chores.{id}.listed", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct ChoreListed {
    pub id: String,
    /// "ok", "hang" or "panic".
    pub mode: String,
}

fn chore(id: &str, mode: &str) -> ChoreListed {
    ChoreListed {
        id: id.into(),
        mode: mode.into(),
    }
}

#[derive(Clone, Default)]
struct Counters {
    calls: Arc<AtomicU32>,
    ok: Arc<AtomicU32>,
}

async fn server_and_publisher() -> (NatsServer, choreo::async_nats::Client, Publisher) {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "lister").unwrap();
    (server, client, publisher)
}

/// Starts `handler` in service `chores` with `counters` as its state.
async fn start<H: Handler>(
    client: &choreo::async_nats::Client,
    counters: &Counters,
    handler: H,
) -> choreo::ServiceHandle {
    Service::new("chores")
        .state(counters.clone())
        .handler(handler)
        .start(client.clone())
        .await
        .unwrap()
}

/// Publishes `n` good chores and waits until `counters` saw them all.
async fn good_chores_still_run(publisher: &Publisher, counters: &Counters, n: u32) {
    for i in 0..n {
        publisher
            .publish(&chore(&format!("good-{i}"), "ok"))
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "the good chores", || {
        counters.ok.load(Ordering::SeqCst) == n
    })
    .await;
}

#[event_handler(max_deliver = 2, backoff = ["100ms"], ack_wait = "1s", timeout = "400ms")]
async fn do_chore(c: ChoreListed, State(n): State<Counters>) {
    n.calls.fetch_add(1, Ordering::SeqCst);
    if c.mode == "hang" {
        std::future::pending::<()>().await;
    }
    n.ok.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn a_handler_that_never_returns_times_out_is_retried_then_dead_lettered_with_reason_timeout()
{
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    let svc = start(&client, &counters, do_chore).await;
    publisher.publish(&chore("stuck", "hang")).await.unwrap();
    good_chores_still_run(&publisher, &counters, 3).await;
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        header(&letters[0], choreo::dlq::REASON).as_deref(),
        Some("timeout")
    );
    assert!(
        header(&letters[0], choreo::dlq::DETAIL)
            .unwrap()
            .contains("timed out after 400ms"),
        "{:?}",
        header(&letters[0], choreo::dlq::DETAIL)
    );
    let stats = svc.stats("do_chore").unwrap();
    assert_eq!(stats.timed_out(), 2, "both deliveries timed out");
    assert_eq!(stats.retried(), 1);
    assert_eq!(stats.dead_lettered(), 1);
    // 2 deliveries of the stuck chore, 3 good ones.
    assert_eq!(counters.calls.load(Ordering::SeqCst), 5);
    svc.shutdown().await;
}

/// An extractor whose extraction panics.
struct Explosive;

impl FromContext for Explosive {
    fn from_context(_: &Context) -> Result<Self, HandlerError> {
        panic!("the extractor blew up")
    }
}

#[event_handler(max_deliver = 2, backoff = ["100ms"])]
async fn with_explosive(c: ChoreListed, State(n): State<Counters>, _e: Explosive) {
    n.calls.fetch_add(1, Ordering::SeqCst);
    let _ = c;
}

#[tokio::test]
async fn a_panicking_extractor_is_caught_retried_and_dead_lettered() {
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    let svc = start(&client, &counters, with_explosive).await;
    publisher.publish(&chore("x", "ok")).await.unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        header(&letters[0], choreo::dlq::REASON).as_deref(),
        Some("max-deliver-exceeded")
    );
    assert!(
        header(&letters[0], choreo::dlq::DETAIL)
            .unwrap()
            .contains("panicked: the extractor blew up")
    );
    let stats = svc.stats("with_explosive").unwrap();
    assert_eq!(stats.panicked(), 2);
    assert_eq!(stats.task_panics(), 0);
    assert_eq!(counters.calls.load(Ordering::SeqCst), 0);
    svc.shutdown().await;
}

/// A hand-written handler whose `call` panics before it returns a future.
struct Manual;

impl Handler for Manual {
    type Event = ChoreListed;

    fn name(&self) -> &'static str {
        "manual"
    }

    fn options(&self) -> HandlerOptions {
        HandlerOptions::default()
            .max_deliver(2)
            .backoff(vec![Duration::from_millis(100)])
    }

    fn call(
        &self,
        event: Envelope<ChoreListed>,
        ctx: &Context,
    ) -> BoxFuture<Result<(), HandlerError>> {
        let State(counters) = State::<Counters>::from_context(ctx).unwrap();
        if event.event().mode == "panic" {
            panic!("the hand-written handler blew up");
        }
        Box::pin(async move {
            counters.ok.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_hand_written_handler_panicking_in_call_is_caught() {
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    let svc = start(&client, &counters, Manual).await;
    publisher.publish(&chore("m", "panic")).await.unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert!(
        header(&letters[0], choreo::dlq::DETAIL)
            .unwrap()
            .contains("panicked: the hand-written handler blew up")
    );
    assert_eq!(svc.stats("manual").unwrap().panicked(), 2);
    good_chores_still_run(&publisher, &counters, 3).await;
    svc.shutdown().await;
}

/// A field whose `Deserialize` panics on the value 13.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Touchy(u32);

impl<'de> serde::Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        assert!(v != 13, "Touchy cannot bear 13");
        Ok(Self(v))
    }
}

#[event(subject = "touchy.{id}.weighed", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct TouchyWeighed {
    pub id: String,
    pub weight: Touchy,
}

#[event_handler]
async fn weigh(e: TouchyWeighed, State(n): State<Counters>) {
    let _ = e;
    n.ok.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn a_panicking_deserialize_impl_dead_letters_the_event_at_once() {
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    let svc = start(&client, &counters, weigh).await;
    for (id, w) in [("a", 1), ("b", 13), ("c", 2)] {
        publisher
            .publish(&TouchyWeighed {
                id: id.into(),
                weight: Touchy(w),
            })
            .await
            .unwrap();
    }
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(
        header(&letters[0], choreo::dlq::REASON).as_deref(),
        Some("undecodable-payload")
    );
    assert!(
        header(&letters[0], choreo::dlq::DETAIL)
            .unwrap()
            .contains("decoding the event panicked: Touchy cannot bear 13")
    );
    eventually(Duration::from_secs(5), "the two others", || {
        counters.ok.load(Ordering::SeqCst) == 2
    })
    .await;
    let stats = svc.stats("weigh").unwrap();
    assert_eq!((stats.panicked(), stats.dead_lettered()), (1, 1));
    svc.shutdown().await;
}

#[event(subject = "parcels.{id}.sent", name = "ParcelSent", version = 1)]
#[derive(Debug, Clone, PartialEq)]
pub struct ParcelSentV1 {
    pub id: String,
}

#[event(subject = "parcels.{id}.sent", version = 2, upcast_from = ParcelSentV1)]
#[derive(Debug, Clone, PartialEq)]
pub struct ParcelSent {
    pub id: String,
    pub grams: u32,
}

impl From<ParcelSentV1> for ParcelSent {
    fn from(v1: ParcelSentV1) -> Self {
        assert!(v1.id != "fragile", "no upcast for fragile parcels");
        Self {
            id: v1.id,
            grams: 0,
        }
    }
}

#[event_handler]
async fn track(e: ParcelSent, State(n): State<Counters>) {
    let _ = e;
    n.ok.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn a_panicking_from_upcast_dead_letters_the_event_at_once() {
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    let svc = start(&client, &counters, track).await;
    for id in ["sturdy", "fragile"] {
        publisher
            .publish(&ParcelSentV1 { id: id.into() })
            .await
            .unwrap();
    }
    publisher
        .publish(&ParcelSent {
            id: "new".into(),
            grams: 5,
        })
        .await
        .unwrap();
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert!(
        header(&letters[0], choreo::dlq::DETAIL)
            .unwrap()
            .contains("panicked: no upcast for fragile parcels")
    );
    eventually(Duration::from_secs(5), "the two others", || {
        counters.ok.load(Ordering::SeqCst) == 2
    })
    .await;
    svc.shutdown().await;
}

#[tokio::test]
async fn a_task_panicking_outside_the_guard_is_counted_and_its_event_comes_back() {
    let (_server, client, publisher) = server_and_publisher().await;
    let counters = Counters::default();
    // The fault hook runs after the handler returned, outside the guard
    // that covers user code: the nearest thing to a bug in choreo.
    let armed = Arc::new(AtomicU32::new(1));
    let hook_armed = armed.clone();
    let svc = Service::new("chores")
        .state(counters.clone())
        .handler(do_chore)
        .fault_hook(Arc::new(move |point, _| {
            if point == FaultPoint::BeforeEmit && hook_armed.swap(0, Ordering::SeqCst) == 1 {
                panic!("a bug after the handler");
            }
            false
        }))
        .start(client.clone())
        .await
        .unwrap();
    publisher.publish(&chore("once", "ok")).await.unwrap();
    let stats = || svc.stats("do_chore").unwrap();
    eventually(
        Duration::from_secs(5),
        "the task panic to be counted",
        || stats().task_panics() == 1,
    )
    .await;
    // No verdict was given; JetStream redelivers after ack_wait (1 s).
    eventually(
        Duration::from_secs(5),
        "the redelivery to be handled",
        || stats().handled() == 1,
    )
    .await;
    assert_eq!(counters.calls.load(Ordering::SeqCst), 2);
    svc.shutdown().await;
}
