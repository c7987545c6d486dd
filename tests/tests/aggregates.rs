//! Event-sourced aggregates against real servers: decisions guarded by the
//! last sequence read, several events as one atomic batch, refusals that
//! append nothing, racing writers that never decide on stale state (one
//! node, and a 3-node R3 cluster with writers on different nodes), time
//! travel, older event versions, and a handler's decision that a
//! redelivery does not repeat.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::aggregate::testing::{given, given_stored};
use choreo::async_nats::jetstream;
use choreo::{
    Aggregate, AggregateErrorKind, AggregateEvent, Aggregates, At, Context, DecideError, Decider,
    HandlerError, Publisher, Service, State, StreamSettings, event, event_handler,
};
use choreo_testkit::{NatsCluster, NatsServer};
use common::eventually;

#[event(subject = "stock.{sku}.received", name = "StockReceived", version = 1)]
#[derive(Debug, Clone, PartialEq)]
pub struct StockReceivedV1 {
    pub sku: String,
}

#[event(subject = "stock.{sku}.received", version = 2, upcast_from = StockReceivedV1)]
#[derive(Debug, Clone, PartialEq)]
pub struct StockReceived {
    pub sku: String,
    pub qty: u32,
}

/// A v1 receipt carried no quantity: it was always one unit.
impl From<StockReceivedV1> for StockReceived {
    fn from(v1: StockReceivedV1) -> Self {
        Self {
            sku: v1.sku,
            qty: 1,
        }
    }
}

#[event(subject = "stock.{sku}.reserved")]
#[derive(Debug, Clone, PartialEq)]
pub struct StockReserved {
    pub sku: String,
    pub order_id: String,
    pub qty: u32,
}

#[event(subject = "stock.{sku}.low")]
#[derive(Debug, Clone, PartialEq)]
pub struct StockLow {
    pub sku: String,
    pub left: u32,
}

#[derive(AggregateEvent, Debug, Clone, PartialEq)]
pub enum StockEvent {
    Received(StockReceived),
    Reserved(StockReserved),
    Low(StockLow),
}

#[derive(Default, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stock {
    on_hand: u32,
    reservations: Vec<String>,
}

impl Aggregate for Stock {
    const NAME: &'static str = "Stock";
    type Event = StockEvent;
    fn filter(sku: &str) -> String {
        format!("stock.{sku}.*")
    }
    fn apply(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Received(e) => self.on_hand += e.qty,
            StockEvent::Reserved(e) => {
                // A fold never panics on what was stored: a negative stock
                // shows as a wrap that the tests look for.
                self.on_hand = self.on_hand.wrapping_sub(e.qty);
                self.reservations.push(e.order_id.clone());
            }
            StockEvent::Low(_) => {}
        }
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        choreo::aggregate::snapshot::to_cbor(self)
    }
    fn restore(bytes: &[u8]) -> Option<Self> {
        choreo::aggregate::snapshot::from_cbor(bytes)
    }
}

/// `Stock` with another shape: the same name, a field more.
#[derive(Default, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StockV2 {
    on_hand: u32,
    reserved: u32,
}

impl Aggregate for StockV2 {
    const NAME: &'static str = "Stock";
    type Event = StockEvent;
    fn filter(sku: &str) -> String {
        format!("stock.{sku}.*")
    }
    fn apply(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Received(e) => self.on_hand += e.qty,
            StockEvent::Reserved(e) => {
                self.on_hand = self.on_hand.wrapping_sub(e.qty);
                self.reserved += e.qty;
            }
            StockEvent::Low(_) => {}
        }
    }
    fn snapshot(&self) -> Option<Vec<u8>> {
        choreo::aggregate::snapshot::to_cbor(self)
    }
    fn restore(bytes: &[u8]) -> Option<Self> {
        choreo::aggregate::snapshot::from_cbor(bytes)
    }
}

fn received(sku: &str, qty: u32) -> StockEvent {
    StockEvent::Received(StockReceived {
        sku: sku.into(),
        qty,
    })
}

/// Reserves `qty` for `order`, and says the stock is low when 2 or fewer
/// are left: one or two events, or a refusal.
fn reserve(s: &Stock, sku: &str, order: &str, qty: u32) -> Result<Vec<StockEvent>, String> {
    if s.on_hand < qty {
        return Err(format!("{sku}: {} on hand, {qty} asked", s.on_hand));
    }
    let mut events = vec![StockEvent::Reserved(StockReserved {
        sku: sku.into(),
        order_id: order.into(),
        qty,
    })];
    let left = s.on_hand - qty;
    if left <= 2 {
        events.push(StockEvent::Low(StockLow {
            sku: sku.into(),
            left,
        }));
    }
    Ok(events)
}

async fn store(client: &choreo::async_nats::Client) -> Aggregates {
    Aggregates::new(Publisher::new(client.clone(), "inventory").unwrap())
}

#[test]
fn a_decision_is_tested_without_a_server() {
    given::<Stock>([received("s1", 5)])
        .when(|s| reserve(s, "s1", "o1", 1))
        .then([StockEvent::Reserved(StockReserved {
            sku: "s1".into(),
            order_id: "o1".into(),
            qty: 1,
        })]);
    let refused = given::<Stock>([received("s1", 3)])
        .when(|s| reserve(s, "s1", "o1", 4))
        .then_refused();
    assert_eq!(refused, "s1: 3 on hand, 4 asked");
    // A wrong expectation fails, and says what it expected and got.
    let failed = std::panic::catch_unwind(|| {
        given::<Stock>([received("s1", 3)])
            .when(|s| reserve(s, "s1", "o1", 1))
            .then([]);
    })
    .unwrap_err();
    let text = failed.downcast_ref::<String>().unwrap();
    assert!(
        text.contains("expected: []") && text.contains("o1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_decision_appends_guarded_events_and_a_refusal_appends_nothing() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;

    let first = stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 4)]))
        .await
        .unwrap();
    assert_eq!((first.version, first.state.on_hand), (1, 4));
    assert_eq!(first.appended.len(), 1);
    assert_eq!(first.appended[0].subject, "stock.s1.received");

    // Two events from one decision: one atomic batch, in order.
    let two = stock
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o1", 3))
        .await
        .unwrap();
    let seqs: Vec<u64> = two.appended.iter().map(|a| a.sequence).collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(two.state.on_hand, 1);
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("STOCK").await.unwrap();
    // A history is kept whole, and read and appended as described.
    let config = &stream.cached_info().config;
    assert_eq!(config.max_age, Duration::ZERO);
    assert!(config.allow_direct && config.allow_atomic_publish);
    let m2 = stream.get_raw_message(2).await.unwrap();
    let m3 = stream.get_raw_message(3).await.unwrap();
    let batch = |m: &jetstream::message::StreamMessage| {
        m.headers.get("Nats-Batch-Id").map(|v| v.to_string())
    };
    assert!(
        batch(&m2).is_some() && batch(&m2) == batch(&m3),
        "one batch"
    );
    assert_eq!(
        m2.headers
            .get("Nats-Expected-Last-Subject-Sequence-Subject")
            .map(|v| v.to_string()),
        Some("stock.s1.*".to_owned()),
        "checked against the aggregate's filter"
    );
    // The decision's events are one flow: the first is its root.
    let meta2 = choreo::Metadata::from_headers(&m2.headers).unwrap();
    let meta3 = choreo::Metadata::from_headers(&m3.headers).unwrap();
    assert_eq!(meta2.correlation_id(), meta2.id());
    assert_eq!(
        (meta3.correlation_id(), meta3.causation_id()),
        (meta2.id(), Some(meta2.id()))
    );
    assert_eq!(meta2.source(), "inventory");

    // A refusal appends nothing.
    let refused = stock
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o2", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, DecideError::Refused(e) if e.contains("1 on hand")),
        "{refused}"
    );
    assert_eq!(stream.clone().info().await.unwrap().state.messages, 3);

    // Another aggregate instance is another boundary.
    let other = stock.load::<Stock>("s2").await.unwrap();
    assert_eq!((other.version, other.events), (0, 0));
}

/// Another writer's decision, run to its end from inside a decision.
fn meanwhile(other: &Aggregates, qty: u32) -> u64 {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            other
                .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", qty)]))
                .await
                .unwrap()
                .version
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_decision_conflicts_and_is_decided_again_on_fresh_state() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    // Another instance (its own store: one store's decisions on an
    // instance take turns and never meet).
    let other = store(&client).await;
    stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 5)]))
        .await
        .unwrap();
    // The first time it decides, another writer appends first.
    let runs = AtomicU32::new(0);
    let decided = stock
        .decide::<Stock, _, String>("s1", |s| {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                assert_eq!(meanwhile(&other, 10), 2);
            }
            reserve(s, "s1", "o1", s.on_hand)
        })
        .await
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "decided again after the conflict"
    );
    let StockEvent::Reserved(r) = stock.history::<Stock>("s1", None).await.unwrap()[2]
        .event
        .clone()
    else {
        panic!("not a reservation")
    };
    assert_eq!(r.qty, 15, "the second decision saw the other writer's 10");
    assert_eq!(decided.state.on_hand, 0);

    // A writer that always loses gives up, naming the aggregate.
    let stubborn = stock.clone().attempts(3);
    let err = stubborn
        .decide::<Stock, _, String>("s1", |_| {
            meanwhile(&other, 1);
            Ok(vec![received("s1", 100)])
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DecideError::Conflict { aggregate: "Stock", id, attempts: 3 } if id == "s1"),
        "{err}"
    );
    assert!(err.to_string().contains("Stock s1"), "{err}");
}

/// Decisions on one instance through one store take turns: twenty at once,
/// each allowed a single attempt, all succeed.
#[tokio::test]
async fn decisions_in_one_process_take_turns_instead_of_conflicting() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await.attempts(1);
    let decisions = (0..20)
        .map(|_| stock.decide::<Stock, _, String>("turns", |_| Ok(vec![received("turns", 1)])));
    for d in futures::future::join_all(decisions).await {
        assert_eq!(d.unwrap().attempts, 1);
    }
    assert_eq!(
        stock.load::<Stock>("turns").await.unwrap().state.on_hand,
        20
    );
}

/// Racing writers on a few hot SKUs: none oversells, every order is
/// reserved or refused exactly once, and no decision ran on stale state
/// (each reservation's `on_hand` before it is what the history says).
async fn race(clients: Vec<choreo::async_nats::Client>, orders: u32, skus: u32) {
    let stores: Vec<Aggregates> = {
        let mut v = Vec::new();
        for c in &clients {
            v.push(store(c).await.attempts(50));
        }
        v
    };
    // Each SKU gets a third as many units as there are orders for it.
    let per_sku = orders / skus;
    for sku in 0..skus {
        let id = format!("hot{sku}");
        stores[0]
            .decide::<Stock, _, String>(&id, |_| {
                Ok(vec![StockEvent::Received(StockReceived {
                    sku: id.clone(),
                    qty: per_sku / 3,
                })])
            })
            .await
            .unwrap();
    }
    // 8 decisions at once, spread over the writers.
    let mut tasks = Vec::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    for o in 0..orders {
        let stock = stores[o as usize % stores.len()].clone();
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.unwrap();
            let id = format!("hot{}", o % skus);
            let order = format!("o{o}");
            match stock
                .decide::<Stock, _, _>(&id, |s| reserve(s, &id, &order, 1))
                .await
            {
                Ok(_) => true,
                Err(DecideError::Refused(_)) => false,
                Err(e) => panic!("{order}: {e}"),
            }
        }));
    }
    let mut reserved = 0;
    for t in tasks {
        if t.await.unwrap() {
            reserved += 1;
        }
    }
    let mut in_history = 0;
    for sku in 0..skus {
        let id = format!("hot{sku}");
        let history = stores[0].history::<Stock>(&id, None).await.unwrap();
        let mut state = Stock::default();
        for r in &history {
            if let StockEvent::Reserved(_) = &r.event {
                assert!(
                    state.on_hand >= 1,
                    "{id}: reserved at {} with nothing on hand",
                    r.sequence
                );
                in_history += 1;
            }
            state.apply(&r.event);
        }
        assert_eq!(state.on_hand, 0, "{id}: every unit reserved, none twice");
        let mut orders: Vec<&String> = state.reservations.iter().collect();
        orders.sort();
        orders.dedup();
        assert_eq!(
            orders.len(),
            state.reservations.len(),
            "{id}: an order reserved twice"
        );
    }
    assert_eq!(reserved, in_history);
    assert_eq!(reserved, skus * (per_sku / 3));
}

#[tokio::test]
async fn racing_writers_never_oversell_on_one_node() {
    let server = NatsServer::start().await.unwrap();
    let clients = vec![
        server.connect().await.unwrap(),
        server.connect().await.unwrap(),
    ];
    race(clients, 300, 3).await;
}

#[tokio::test]
async fn racing_writers_on_different_nodes_never_oversell_on_a_cluster() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    Publisher::new(client.clone(), "setup")
        .unwrap()
        .stream_settings(StreamSettings::default().replicas(3))
        .ensure_stream::<StockReserved>()
        .await
        .unwrap();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(cluster.node(i).connect().await.unwrap());
    }
    race(clients, 300, 3).await;
}

#[tokio::test]
async fn time_travel_and_older_versions_load() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    // A v1 receipt, written by older code with a plain publisher: it loads
    // through the upcast, and the load warns it skipped the check.
    Publisher::new(client.clone(), "old-inventory")
        .unwrap()
        .publish(&StockReceivedV1 { sku: "s1".into() })
        .await
        .unwrap();
    let loaded = stock.load::<Stock>("s1").await.unwrap();
    assert_eq!((loaded.state.on_hand, loaded.version), (1, 1));
    stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 5)]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stock
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o1", 4))
        .await
        .unwrap();
    let now = stock.load::<Stock>("s1").await.unwrap();
    assert_eq!((now.state.on_hand, now.version, now.events), (2, 4, 4));
    let at2 = stock.load_at::<Stock>("s1", At::Sequence(2)).await.unwrap();
    assert_eq!((at2.state.on_hand, at2.version, at2.events), (6, 2, 2));
    let then = stock
        .load_at::<Stock>("s1", At::Time(between))
        .await
        .unwrap();
    assert_eq!((then.state.on_hand, then.version), (6, 2));
    let history = stock
        .history::<Stock>("s1", Some(At::Sequence(3)))
        .await
        .unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].meta.version(), 1, "the stored version is kept");
    assert_eq!(history[0].event, received("s1", 1));
}

#[tokio::test]
async fn an_event_the_aggregate_does_not_know_stops_the_decision() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    #[event(subject = "stock.{sku}.audited")]
    struct StockAudited {
        sku: String,
    }
    Publisher::new(client.clone(), "auditor")
        .unwrap()
        .publish(&StockAudited { sku: "s1".into() })
        .await
        .unwrap();
    let err = stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
        .await
        .unwrap_err();
    let DecideError::Failed(e) = &err else {
        panic!("{err}")
    };
    assert_eq!(e.kind(), AggregateErrorKind::ForeignEvent);
    assert!(e.to_string().contains("StockAudited"), "{e}");
}

#[tokio::test]
async fn the_decision_is_tested_against_a_real_stream() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    given_stored::<Stock>(&stock, "s9", [received("s9", 3)])
        .await
        .when::<Stock, _>(|s| reserve(s, "s9", "o1", 2))
        .await
        .then([
            StockEvent::Reserved(StockReserved {
                sku: "s9".into(),
                order_id: "o1".into(),
                qty: 2,
            }),
            StockEvent::Low(StockLow {
                sku: "s9".into(),
                left: 1,
            }),
        ]);
    let history = stock.history::<Stock>("s9", None).await.unwrap();
    assert_eq!(history.len(), 3);
}

#[event(subject = "orders.{order_id}.placed")]
#[derive(Debug, Clone)]
pub struct OrderPlaced {
    pub order_id: String,
    pub sku: String,
}

#[event(subject = "orders.{order_id}.accepted")]
#[derive(Debug, Clone)]
pub struct OrderAccepted {
    pub order_id: String,
}

/// Fails its first delivery after deciding, as a process dying before the
/// ack would: the redelivery must find the decision, not make another.
#[derive(Clone, Default)]
struct Crashes(Arc<AtomicU32>);

#[event_handler]
async fn accept(
    order: OrderPlaced,
    ctx: Context,
    stock: Decider,
    crashes: State<Crashes>,
) -> Result<(), HandlerError> {
    // Two decisions on one instance: the second is not the first's
    // redelivery, though it finds the first's events caused by this event.
    let mut earlier = Vec::new();
    for line in ["", "-spare"] {
        let order_id = format!("{}{line}", order.order_id);
        let decided = stock
            .decide::<Stock, _, _>(&order.sku, |s| reserve(s, &order.sku, &order_id, 1))
            .await
            .map_err(|e| e.into_handler_error())?;
        earlier.push(decided.earlier);
    }
    if crashes.0.0.fetch_add(1, Ordering::SeqCst) == 0 {
        assert_eq!(earlier, [false, false], "the first delivery decides both");
        return Err(HandlerError::retryable("dies after its decisions"));
    }
    assert_eq!(earlier, [true, true], "the redelivery found both decisions");
    ctx.emit(OrderAccepted {
        order_id: order.order_id,
    });
    Ok(())
}

#[tokio::test]
async fn a_handler_decides_with_its_event_as_cause_and_a_redelivery_does_not_decide_twice() {
    redelivered_decision(None).await;
}

#[tokio::test]
async fn without_the_cache_a_redelivery_finds_its_decision_in_the_history() {
    redelivered_decision(Some(0)).await;
}

async fn redelivered_decision(cache: Option<usize>) {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let mut stock = store(&client).await;
    if let Some(c) = cache {
        stock = stock.cache(c);
    }
    stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 5)]))
        .await
        .unwrap();
    let crashes = Crashes::default();
    let svc = Service::new("inventory")
        .state(stock.clone())
        .state(crashes.clone())
        .handler(accept)
        .start(client.clone())
        .await
        .unwrap();
    let placed = Publisher::new(client.clone(), "web")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o1".into(),
            sku: "s1".into(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the order is accepted", || {
        crashes.0.load(Ordering::SeqCst) >= 2
    })
    .await;
    let history = stock.history::<Stock>("s1", None).await.unwrap();
    let reservations: Vec<_> = history
        .iter()
        .filter(|r| matches!(r.event, StockEvent::Reserved(_)))
        .collect();
    assert_eq!(
        reservations.len(),
        2,
        "reserved once per decision for two deliveries"
    );
    let meta = &reservations[0].meta;
    assert_eq!(meta.causation_id(), Some(placed.event_id));
    assert_eq!(meta.correlation_id(), placed.correlation_id);
    assert_eq!(meta.source(), "inventory");
    svc.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_shortens_the_load_and_a_changed_state_never_reads_an_old_one() {
    use choreo::aggregate::SnapshotPolicy;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let plain = store(&client).await;
    for _ in 0..30 {
        plain
            .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
            .await
            .unwrap();
    }
    // The store that decided keeps the state: loading it again reads
    // nothing.
    assert_eq!(plain.load::<Stock>("s1").await.unwrap().read, 0);
    let js = jetstream::new(client.clone());
    // With the default lag (an hour), events this fresh go into no snapshot.
    let lagging = store(&client).await.snapshots(SnapshotPolicy::every(10));
    assert_eq!(lagging.load::<Stock>("s1").await.unwrap().read, 30);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        js.get_key_value(choreo::aggregate::snapshot::BUCKET)
            .await
            .map(|_| ())
            .is_err()
            || keys(&js).await.is_empty(),
        "no snapshot of events younger than the lag"
    );

    let snapshotting = store(&client)
        .await
        .snapshots(SnapshotPolicy::every(10).lag(Duration::ZERO));
    let first = snapshotting.load::<Stock>("s1").await.unwrap();
    assert_eq!((first.read, first.state.on_hand), (30, 30));
    eventually_async(|| async { keys(&js).await.len() == 1 }).await;
    plain
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 2)]))
        .await
        .unwrap();
    // A new store, so nothing comes from the first one's memory.
    let second = store(&client)
        .await
        .snapshots(SnapshotPolicy::every(10).lag(Duration::ZERO))
        .load::<Stock>("s1")
        .await
        .unwrap();
    assert_eq!(
        (
            second.read,
            second.events,
            second.version,
            second.state.on_hand
        ),
        (1, 31, 31, 32),
        "from the snapshot, then the one event after it"
    );
    // A decision starts from the snapshot too.
    let decided = snapshotting
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o1", 32))
        .await
        .unwrap();
    assert_eq!(decided.state.on_hand, 0);

    // Another shape of the state: another key, the whole history read.
    let v2 = snapshotting.load::<StockV2>("s1").await.unwrap();
    assert_eq!((v2.read, v2.state.on_hand, v2.state.reserved), (33, 0, 32));
}

/// The snapshot bucket's keys.
async fn keys(js: &jetstream::Context) -> Vec<String> {
    use futures::StreamExt;
    let Ok(kv) = js.get_key_value(choreo::aggregate::snapshot::BUCKET).await else {
        return Vec::new();
    };
    let Ok(keys) = kv.keys().await else {
        return Vec::new();
    };
    keys.filter_map(|k| async move { k.ok() }).collect().await
}

async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A load slower than the policy's limit writes a snapshot though it read
/// fewer events than `every`.
#[tokio::test]
async fn a_slow_load_writes_a_snapshot() {
    use choreo::aggregate::SnapshotPolicy;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let plain = store(&client).await;
    for _ in 0..3 {
        plain
            .decide::<Stock, _, String>("s2", |_| Ok(vec![received("s2", 1)]))
            .await
            .unwrap();
    }
    let js = jetstream::new(client.clone());
    let policy = SnapshotPolicy::every(1_000_000).lag(Duration::ZERO);
    store(&client)
        .await
        .snapshots(policy)
        .load::<Stock>("s2")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(keys(&js).await.is_empty(), "3 events are not a million");
    store(&client)
        .await
        .snapshots(policy.or_slower_than(Duration::ZERO))
        .load::<Stock>("s2")
        .await
        .unwrap();
    eventually_async(|| async { keys(&js).await.iter().any(|k| k.ends_with(".s2")) }).await;
}

/// A decision on a state in memory appends without reading first (its
/// check tells whether anyone appended since); a refusal, which has no
/// check, is made again on the state read to the stream's end.
#[tokio::test]
async fn a_refusal_on_a_state_in_memory_is_checked_against_the_stream() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let here = store(&client).await;
    let elsewhere = store(&server.connect().await.unwrap()).await;
    here.decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
        .await
        .unwrap();
    here.decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o1", 1))
        .await
        .unwrap();
    // Another process receives stock; this one's memory still says none.
    elsewhere
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 5)]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let decided = here
        .decide::<Stock, _, _>("s1", |s| {
            seen.push(s.on_hand);
            reserve(s, "s1", "o2", 2)
        })
        .await
        .unwrap();
    assert_eq!(seen, [0, 5], "refused on memory, decided on the stream");
    assert_eq!((decided.state.on_hand, decided.attempts), (3, 1));

    // A decision on a state in memory that others changed conflicts, and
    // is made again on the state read.
    elsewhere
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
        .await
        .unwrap();
    let decided = here
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o3", 1))
        .await
        .unwrap();
    assert_eq!((decided.state.on_hand, decided.attempts), (3, 2));
    // After the conflict the instance counts as contended: the next
    // decision reads first, and so meets no conflict.
    elsewhere
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
        .await
        .unwrap();
    let decided = here
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o4", 1))
        .await
        .unwrap();
    assert_eq!((decided.state.on_hand, decided.attempts), (3, 1));
}

/// A service that registers `Stock` answers for its state at a point,
/// folding with its own `apply`, under exactly the permissions it and an
/// observer are documented to need; a wrong name or a service nobody runs
/// is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_answers_for_an_aggregates_state_at_a_point() {
    use choreo::Permissions;
    use choreo::admin::{AdminErrorKind, aggregate_state};
    use choreo::aggregate::inspect::StateRequest;

    let api = Default::default();
    let inventory = || Service::new("inventory").aggregate::<Stock>();
    let needs = inventory().permissions();
    assert!(
        needs.responds()
            && needs
                .subscribe()
                .contains(&"$CHOREO.STATE.inventory".to_owned())
    );
    let config = format!(
        "authorization {{ users = [ \
           {{ user: inventory, password: pw, permissions: {} }}, \
           {{ user: viewer, password: pw, permissions: {} }}, \
           {{ user: setup, password: pw }} ] }}",
        needs.to_config(),
        Permissions::observer(&api).to_config(),
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let url = server.url();
    let login = |name: &'static str| {
        let url = url.clone();
        async move {
            let opts = choreo::async_nats::ConnectOptions::with_user_and_password(
                name.into(),
                "pw".into(),
            );
            choreo::connect(&url, opts).await
        }
    };
    let setup = login("setup").await.unwrap();
    let stock = store(&setup).await;
    stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 4)]))
        .await
        .unwrap();
    stock
        .decide::<Stock, _, _>("s1", |s| reserve(s, "s1", "o1", 3))
        .await
        .unwrap();
    let svc = inventory()
        .start(login("inventory").await.unwrap())
        .await
        .unwrap();
    let js = jetstream::new(login("viewer").await.unwrap());
    let within = Duration::from_secs(5);

    let now = aggregate_state(&js, "inventory", &StateRequest::new("Stock", "s1"), within)
        .await
        .unwrap();
    assert_eq!((now.version, now.events), (3, 3));
    assert_eq!(now.state.as_ref().unwrap()["on_hand"], 1);
    assert_eq!(
        now.state.as_ref().unwrap()["reservations"],
        serde_json::json!(["o1"])
    );
    let then = aggregate_state(
        &js,
        "inventory",
        &StateRequest::new("Stock", "s1").until_sequence(1),
        within,
    )
    .await
    .unwrap();
    assert_eq!((then.version, then.events), (1, 1));
    assert_eq!(then.state.unwrap()["on_hand"], 4);

    let e = aggregate_state(&js, "inventory", &StateRequest::new("Basket", "b1"), within)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), AdminErrorKind::BadRequest);
    assert!(
        e.to_string()
            .contains("inventory answers for Stock, not Basket"),
        "{e}"
    );
    let e = aggregate_state(&js, "billing", &StateRequest::new("Stock", "s1"), within)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no instance of billing answers state requests"),
        "{e}"
    );
    svc.shutdown().await;
}

/// The server's count of subscriptions ever made (`/subsz`'s
/// `num_inserts`), read from its monitoring port.
fn subscriptions_made(server: &NatsServer) -> u64 {
    use std::io::{Read, Write};
    let addr = format!("127.0.0.1:{}", server.monitor_port());
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET /subsz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    let subsz: serde_json::Value = serde_json::from_str(body).unwrap();
    subsz["num_inserts"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_at_once_share_one_subscription_and_each_gets_its_own_events() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    for i in 0..20u32 {
        let sku = format!("s{i}");
        stock
            .decide::<Stock, _, String>(&sku, |_| Ok(vec![received(&sku, i + 1)]))
            .await
            .unwrap();
    }
    // A history longer than one batched read (256 events).
    let publisher = Publisher::new(client.clone(), "inventory").unwrap();
    for _ in 0..600 {
        publisher
            .publish(&StockReceived {
                sku: "long".into(),
                qty: 1,
            })
            .await
            .unwrap();
    }
    // Nothing in memory: every load reads from the stream's start.
    let loads = Aggregates::new(publisher).cache(0);
    assert_eq!(loads.load::<Stock>("s0").await.unwrap().state.on_hand, 1);
    let before = subscriptions_made(&server);
    let each = (0..20u32).map(|i| {
        let loads = loads.clone();
        async move {
            let loaded = loads.load::<Stock>(&format!("s{i}")).await.unwrap();
            assert_eq!((loaded.state.on_hand, loaded.events), (i + 1, 1), "s{i}");
        }
    });
    let long = async {
        let loaded = loads.load::<Stock>("long").await.unwrap();
        assert_eq!((loaded.state.on_hand, loaded.read), (600, 600));
        assert_eq!(
            loads.history::<Stock>("long", None).await.unwrap().len(),
            600
        );
    };
    futures::future::join(futures::future::join_all(each), long).await;
    assert_eq!(
        subscriptions_made(&server),
        before,
        "a load made a subscription of its own"
    );
}

/// A load's future (which a decision boxes for each instance it opens) is
/// allocated and copied on every decision: the stream's setup, the
/// snapshot's read and the answers' subscription, each needed once or
/// rarely, are boxed apart so it does not carry them (it was 8 KB).
#[tokio::test]
async fn a_load_s_future_does_not_carry_what_it_rarely_needs() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    let load = stock.load::<Stock>("s1");
    let decide = stock.decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]));
    for (what, size) in [
        ("load", std::mem::size_of_val(&load)),
        ("decide", std::mem::size_of_val(&decide)),
    ] {
        assert!(size < 4096, "a {what} future of {size} bytes");
    }
}

#[event(subject = "audit.{sku}.noted")]
#[derive(Debug, Clone, PartialEq)]
pub struct AuditNoted {
    pub sku: String,
}

#[derive(AggregateEvent, Debug, Clone, PartialEq)]
pub enum SpreadEvent {
    Received(StockReceived),
    Noted(AuditNoted),
}

/// An aggregate whose events live in two streams (`STOCK`, `AUDIT`).
#[derive(Default, Debug, Clone)]
pub struct Spread;

impl Aggregate for Spread {
    const NAME: &'static str = "Spread";
    type Event = SpreadEvent;
    fn filter(sku: &str) -> String {
        format!("stock.{sku}.*")
    }
    fn apply(&mut self, _: &SpreadEvent) {}
}

#[tokio::test]
async fn an_aggregate_whose_events_live_in_two_streams_is_refused_even_beside_one_set_up() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let stock = store(&client).await;
    // `Stock` sets up the stream `Spread`'s first event type lives in.
    stock
        .decide::<Stock, _, String>("s1", |_| Ok(vec![received("s1", 1)]))
        .await
        .unwrap();
    for _ in 0..2 {
        let err = stock.load::<Spread>("s1").await.unwrap_err();
        assert!(err.to_string().contains("two streams"), "{err}");
    }
}
