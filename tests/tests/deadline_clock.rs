//! "B within T of A" is judged by when B was stored, by the server's clock,
//! not by which of choreo's consumers gets to its message first: a B
//! stored in time wins while its watcher is held back past the deadline,
//! and a B stored late loses though its watcher handles it before the
//! fired copy is handled. On one node, and on a 3-node cluster with the
//! streams' leaders changed in between.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::admin::deadlines::{self, DeadlineState};
use choreo::async_nats::jetstream;
use choreo::{Context, Event, EventId, Publisher, Service, State, event, event_handler};
use choreo_testkit::{NatsCluster, NatsServer};
use common::eventually;

#[event(subject = "dc.orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderPlaced {
    pub order_id: String,
    /// How long after the order its payment is published, in ms (`None`:
    /// never).
    pub pays_after_ms: Option<u64>,
}

#[event(subject = "dc.payments.{order_id}.captured", key = order_id)]
#[derive(Debug, Clone)]
pub struct PaymentCaptured {
    pub order_id: String,
}

/// The orders the deadline handler ran for, with the number of runs.
#[derive(Clone, Default)]
struct Ran(Arc<Mutex<HashMap<String, u32>>>);

impl Ran {
    fn runs(&self) -> HashMap<String, u32> {
        self.0.lock().unwrap().clone()
    }
}

/// Expires an order whose payment has not come 3 s after it was stored.
#[event_handler(within = "3s", unless = PaymentCaptured)]
async fn expire(order: OrderPlaced, ran: State<Ran>) {
    *ran.0.0.lock().unwrap().entry(order.order_id).or_default() += 1;
}

/// Pays each order `pays_after_ms` after its time, in its flow.
#[event_handler]
async fn pay(order: OrderPlaced, ctx: Context) {
    let Some(after) = order.pays_after_ms else {
        return;
    };
    let at = ctx.meta().time() + Duration::from_millis(after);
    let wait = at - time::OffsetDateTime::now_utc();
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
}

fn order(id: &str, pays_after_ms: Option<u64>) -> OrderPlaced {
    OrderPlaced {
        order_id: id.to_owned(),
        pays_after_ms,
    }
}

async fn state(js: &jetstream::Context, order: &str) -> Option<DeadlineState> {
    let token = EventId::keyed("OrderPlaced", &choreo::EventKey::new([order])).to_string();
    deadlines::deadline(js, "orders", "expire", &token)
        .await
        .ok()
}

/// Holds a consumer back: the server delivers it nothing until `until`.
async fn pause(js: &jetstream::Context, stream: &str, handler: &str, until: Duration) {
    let until = time::OffsetDateTime::now_utc() + until;
    let durable = choreo::__private::consumer_name("orders", handler);
    js.get_stream(stream)
        .await
        .unwrap()
        .pause_consumer(&durable, until)
        .await
        .unwrap();
}

/// Moves a stream's leader to another node of a cluster.
async fn step_down(client: &choreo::async_nats::Client, stream: &str) {
    let reply = client
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            "".into(),
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&reply.payload);
    assert!(
        text.contains("\"success\":true"),
        "stepdown of {stream}: {text}"
    );
}

/// The orders service (`expire`) and payments (`pay`), on `client`.
async fn services(
    client: &choreo::async_nats::Client,
    settings: &choreo::StreamSettings,
    ran: &Ran,
) -> (choreo::ServiceHandle, choreo::ServiceHandle) {
    let orders = Service::new("orders")
        .state(ran.clone())
        .stream_settings(settings.clone())
        .deadline(expire)
        .start(client.clone())
        .await
        .unwrap();
    let payments = Service::new("payments")
        .stream_settings(settings.clone())
        .handler(pay)
        .start(client.clone())
        .await
        .unwrap();
    (orders, payments)
}

/// Waits until each order's deadline is decided as `want` says (`true`:
/// met), and fails with the states if that does not come.
async fn decided(js: &jetstream::Context, want: &[(&str, bool)]) {
    let mut states = Vec::new();
    for _ in 0..120 {
        states.clear();
        for (o, met) in want {
            states.push((*o, *met, state(js, o).await));
        }
        if states.iter().all(|(_, met, st)| {
            matches!(
                (st, met),
                (Some(DeadlineState::Met { .. }), true)
                    | (Some(DeadlineState::Fired { .. }), false)
            )
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("not decided as expected (order, met?, state): {states:?}");
}

/// Fails if any of `orders` is decided.
async fn undecided(js: &jetstream::Context, orders: &[&str], why: &str) {
    for o in orders {
        let st = state(js, o).await;
        assert!(
            !matches!(
                st,
                Some(DeadlineState::Fired { .. } | DeadlineState::Met { .. })
            ),
            "{o} was decided {why}: {st:?}"
        );
    }
}

/// Both cases in turn; `leaders_change` runs while the consumers are held
/// back (a cluster's stepdowns, or nothing).
async fn held_back<F, Fut>(
    client: choreo::async_nats::Client,
    settings: choreo::StreamSettings,
    (hold, probe): (Duration, Option<choreo_testkit::GaugeProbe>),
    leaders_change: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let js = jetstream::new(client.clone());
    let ran = Ran::default();
    let (orders, payments) = services(&client, &settings, &ran).await;
    let web = Publisher::new(client.clone(), "web")
        .unwrap()
        .stream_settings(settings);

    // 1. The B watcher held back past the deadline: a payment stored
    //    300 ms after its order still meets it, and an unpaid order's
    //    deadline waits for the watcher before it fires.
    pause(
        &js,
        PaymentCaptured::STREAM,
        "expire__met_PaymentCaptured",
        hold,
    )
    .await;
    let held = tokio::time::Instant::now();
    web.publish(&order("in-time", Some(300))).await.unwrap();
    web.publish(&order("unpaid", None)).await.unwrap();
    leaders_change().await;
    // Past the deadlines (3 s), inside the hold.
    tokio::time::sleep_until(held + hold - Duration::from_secs(2)).await;
    undecided(
        &js,
        &["in-time", "unpaid"],
        "while the watcher was held back",
    )
    .await;
    // What holds them back shows: status gives the deadline handler its
    // watchers' backlog, and the watcher's lag age gauge reads it. Just
    // after a leader change a stream's consumers may not list yet (status
    // then says so in its problems, and has no row): read it again.
    let mut status = None;
    let mut problems = Vec::new();
    while status.is_none() && tokio::time::Instant::now() < held + hold - Duration::from_millis(500)
    {
        let s = choreo::admin::status(&js, Duration::from_millis(200))
            .await
            .unwrap();
        if s.handlers.iter().any(|h| h.durable == "orders--expire") {
            status = Some(s);
        } else {
            problems = s.problems;
        }
    }
    let status =
        status.unwrap_or_else(|| panic!("no status row for the deadline handler: {problems:?}"));
    let row = status
        .handlers
        .iter()
        .find(|h| h.durable == "orders--expire")
        .unwrap();
    let d = row.deadlines.as_ref().unwrap();
    assert_eq!(d.watchers_waiting, 1, "{d:?}");
    assert!(
        d.watchers_behind_ms >= 3000,
        "the payment was stored {} ms ago: {d:?}",
        d.watchers_behind_ms
    );
    if let Some(probe) = &probe {
        let age = probe.value().unwrap_or_default();
        assert!(age >= 2.0, "the watcher's lag age gauge reads {age}");
    }
    assert!(ran.runs().is_empty(), "{:?}", ran.runs());
    decided(&js, &[("in-time", true), ("unpaid", false)]).await;

    // 2. The fired copies held back: a payment stored 1.5 s after its
    //    deadline is handled by its watcher first, and loses.
    pause(&js, "CHOREO_DEADLINES", "expire", hold).await;
    let held = tokio::time::Instant::now();
    web.publish(&order("late", Some(4500))).await.unwrap();
    leaders_change().await;
    tokio::time::sleep_until(held + hold - Duration::from_secs(1)).await;
    let met = choreo::__private::consumer_name("orders", "expire__met_PaymentCaptured");
    let watcher = js
        .get_stream(PaymentCaptured::STREAM)
        .await
        .unwrap()
        .consumer_info(&met)
        .await
        .unwrap();
    assert_eq!(
        (watcher.num_pending, watcher.num_ack_pending),
        (0, 0),
        "the watcher has handled the late payment"
    );
    undecided(&js, &["late"], "while the fired copies were held back").await;
    decided(&js, &[("late", false)]).await;

    eventually(Duration::from_secs(10), "both deadlines ran", || {
        ran.runs().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ran.runs(),
        HashMap::from([("unpaid".to_owned(), 1), ("late".to_owned(), 1)]),
        "the handler runs once for each order without a payment in time"
    );
    orders.shutdown().await;
    payments.shutdown().await;
}

#[tokio::test]
async fn b_is_judged_by_its_stored_time_on_one_node() {
    // The payment watcher's `choreo.consumer.lag.age` gauge.
    let probe = choreo_testkit::GaugeProbe::install_for(
        choreo::observe::LAG_SECONDS,
        ("choreo.handler", "expire__met_PaymentCaptured"),
    )
    .unwrap();
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    held_back(
        client,
        choreo::StreamSettings::default(),
        (Duration::from_secs(8), Some(probe)),
        || async {},
    )
    .await;
}

#[tokio::test]
async fn b_is_judged_by_its_stored_time_across_a_leader_change() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    let c = client.clone();
    held_back(
        client,
        choreo::StreamSettings::default().replicas(3),
        (Duration::from_secs(8), None),
        || {
            let c = c.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                step_down(&c, PaymentCaptured::STREAM).await;
                step_down(&c, "CHOREO_DEADLINES").await;
            }
        },
    )
    .await;
}

/// A service's B watchers start before its schedule step does. Both start
/// at new events, so the other way round a B stored between the two
/// consumers' creation went unseen, and its A's deadline fired though B was
/// stored in time (a failover run starting two orders processes under load
/// expired its first orders so).
#[tokio::test]
async fn the_b_watchers_start_before_the_schedule_step() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let ran = Ran::default();
    let (orders, payments) = services(&client, &choreo::StreamSettings::default(), &ran).await;
    let created = |stream: &'static str, handler: &'static str| {
        let js = js.clone();
        async move {
            let durable = choreo::__private::consumer_name("orders", handler);
            js.get_stream(stream)
                .await
                .unwrap()
                .consumer_info(&durable)
                .await
                .unwrap()
                .created
        }
    };
    let schedule = created(OrderPlaced::STREAM, "expire__schedule").await;
    let watcher = created(PaymentCaptured::STREAM, "expire__met_PaymentCaptured").await;
    assert!(
        watcher < schedule,
        "the watcher was created at {watcher}, the schedule step at {schedule}"
    );
    orders.shutdown().await;
    payments.shutdown().await;
}
