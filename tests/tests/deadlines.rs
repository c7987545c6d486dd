//! Deadlines: "B within T of A, or else". A deadline handler runs with A
//! when no B follows in time, never when one does, exactly once per A —
//! also when B arrives just as the deadline fires, and when the instance
//! that scheduled it is gone.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::admin::deadlines::{self, DeadlineState};
use choreo::{
    Context, EventId, Metadata, Publisher, Service, StartErrorKind, State, event, event_handler,
};
use choreo_testkit::{DeadlineIs, NatsServer};
use common::eventually;

#[event(subject = "dl.orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderPlaced {
    pub order_id: String,
    /// How long after the order its payment comes, in ms (`None`: never).
    pub pays_after_ms: Option<u64>,
}

#[event(subject = "dl.payments.{order_id}.captured", key = order_id)]
#[derive(Debug, Clone)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "dl.orders.{order_id}.cancelled", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderCancelled {
    pub order_id: String,
}

/// What the deadline handler saw, per order: how many runs, and each
/// run's (event id, correlation, lateness after the deadline in ms).
#[derive(Clone, Default)]
struct Fired(Arc<Mutex<HashMap<String, Vec<Run>>>>);

/// One run: the event's id, its correlation id, ms after the deadline.
type Run = (EventId, Option<EventId>, i64);

const WITHIN_MS: i64 = 2000;

/// Cancels an order whose payment has not come 2 s after it was placed.
#[event_handler(within = "2s", unless = PaymentCaptured)]
async fn cancel_unpaid(order: OrderPlaced, ctx: Context, fired: State<Fired>) {
    let due = ctx.meta().time() + Duration::from_millis(WITHIN_MS as u64);
    let late = (time::OffsetDateTime::now_utc() - due).whole_milliseconds() as i64;
    fired
        .0
        .0
        .lock()
        .unwrap()
        .entry(order.order_id.clone())
        .or_default()
        .push((ctx.event_id(), Some(ctx.correlation_id()), late));
    ctx.emit(OrderCancelled {
        order_id: order.order_id,
    });
}

/// Pays each order `pays_after_ms` after its time (in the same flow).
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

async fn state(js: &choreo::async_nats::jetstream::Context, order: &str) -> DeadlineState {
    try_state(js, "cancel_unpaid", order).await.unwrap()
}

async fn try_state(
    js: &choreo::async_nats::jetstream::Context,
    handler: &str,
    order: &str,
) -> Result<DeadlineState, choreo::admin::AdminError> {
    // Matched by correlation: the flow's root is the keyed order event.
    let token = EventId::keyed("OrderPlaced", &choreo::EventKey::new([order])).to_string();
    deadlines::deadline(js, "orders", handler, &token).await
}

/// The orders service with `cancel_unpaid`, and the payments service.
async fn orders_and_payments(
    client: &choreo::async_nats::Client,
    fired: &Fired,
) -> (choreo::ServiceHandle, choreo::ServiceHandle) {
    let orders = Service::new("orders")
        .state(fired.clone())
        .deadline(cancel_unpaid)
        .deadline_retention(Duration::from_secs(600))
        .start(client.clone())
        .await
        .unwrap();
    let payments = Service::new("payments")
        .handler(pay)
        .start(client.clone())
        .await
        .unwrap();
    (orders, payments)
}

#[tokio::test]
async fn a_deadline_fires_once_without_b_and_never_with_it() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let fired = Fired::default();
    let (orders, payments) = orders_and_payments(&client, &fired).await;
    let recorder = choreo_testkit::Recorder::start(&client).await.unwrap();
    let web = Publisher::new(client.clone(), "web").unwrap();
    web.publish(&order("o-unpaid", None)).await.unwrap();
    web.publish(&order("o-paid", Some(300))).await.unwrap();
    let flow = |o: &str| EventId::keyed("OrderPlaced", &choreo::EventKey::new([o]));
    let is = |o: &'static str, want: DeadlineIs| {
        recorder.deadline(
            "orders",
            "cancel_unpaid",
            flow(o),
            want,
            Duration::from_secs(10),
        )
    };
    is("o-unpaid", DeadlineIs::Scheduled).await.unwrap();
    let p = deadlines::pending(&js, "orders", "cancel_unpaid")
        .await
        .unwrap();
    assert!(p.pending >= 1, "{p:?}");
    let next = p.next.expect("a next deadline");
    assert_eq!(next.event, flow("o-unpaid"));
    assert_eq!(next.subject.as_deref(), Some("dl.orders.o-unpaid.placed"));
    is("o-paid", DeadlineIs::Cancelled).await.unwrap();
    is("o-unpaid", DeadlineIs::Fired).await.unwrap();
    let wrong = is("o-paid", DeadlineIs::Fired).await.unwrap_err();
    assert!(wrong.to_string().contains("decided"), "{wrong}");
    // B before A is handled: published by hand in A's flow, first.
    let early = order("o-early", None);
    let a_meta = Metadata::root(&early, "web").unwrap();
    let b = PaymentCaptured {
        order_id: "o-early".into(),
    };
    web.publish_with(
        &b,
        &Metadata::emitted(&b, "payments", &a_meta, "test.pay", 0).unwrap(),
    )
    .await
    .unwrap();
    web.publish_with(&early, &a_meta).await.unwrap();

    let runs = || fired.0.lock().unwrap().clone();
    eventually(
        Duration::from_secs(10),
        "the unpaid order cancelled",
        || runs().contains_key("o-unpaid"),
    )
    .await;
    // Long enough for a wrong second run, or a run for a paid order.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = runs();
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        vec!["o-unpaid"],
        "{runs:?}"
    );
    let [(event, correlation, late)] = runs["o-unpaid"][..] else {
        panic!("ran {} times", runs["o-unpaid"].len());
    };
    let a = EventId::keyed("OrderPlaced", &choreo::EventKey::new(["o-unpaid"]));
    assert_eq!(event, a, "the handler runs with A");
    assert_eq!(correlation, Some(a), "in A's flow");
    assert!(
        (0..1000).contains(&late),
        "ran {late} ms after the deadline"
    );
    // What it emitted continues A's flow, caused by A.
    let cancelled: Vec<_> =
        common::stream_messages(&client, <OrderCancelled as choreo::Event>::STREAM)
            .await
            .into_iter()
            .filter(|m| m.subject.ends_with(".cancelled"))
            .collect();
    assert_eq!(cancelled.len(), 1, "one cancellation");
    let c = &cancelled[0];
    assert_eq!(common::header(c, "ce-correlationid"), Some(a.to_string()));
    assert_eq!(common::header(c, "ce-causationid"), Some(a.to_string()));
    assert_eq!(common::header(c, "ce-source").as_deref(), Some("orders"));

    assert!(
        matches!(state(&js, "o-unpaid").await, DeadlineState::Fired { event, .. } if event == a)
    );
    assert!(matches!(
        state(&js, "o-paid").await,
        DeadlineState::Met { .. }
    ));
    assert!(matches!(
        state(&js, "o-early").await,
        DeadlineState::Met { .. }
    ));
    let p = deadlines::pending(&js, "orders", "cancel_unpaid")
        .await
        .unwrap();
    assert_eq!(p.pending, 0, "{p:?}");
    orders.shutdown().await;
    payments.shutdown().await;
}

/// B arrives at the very moment the deadline fires, for many orders:
/// each order gets exactly one outcome, and both outcomes happen.
#[tokio::test]
async fn b_racing_the_deadline_gives_exactly_one_outcome_per_a() {
    const N: usize = 300;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let fired = Fired::default();
    let (orders, payments) = orders_and_payments(&client, &fired).await;
    let web = Publisher::new(client.clone(), "web").unwrap();
    // Payments due from 150 ms before to 150 ms after the deadline.
    for i in 0..N {
        let after = WITHIN_MS as u64 - 150 + (i as u64 * 300 / N as u64);
        web.publish(&order(&format!("r-{i}"), Some(after)))
            .await
            .unwrap();
    }
    let mut met = HashSet::new();
    let mut undecided = Vec::new();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for _ in 0..50 {
        undecided.clear();
        for i in 0..N {
            let id = format!("r-{i}");
            match state(&js, &id).await {
                DeadlineState::Met { .. } => {
                    met.insert(id);
                }
                DeadlineState::Fired { .. } => {}
                other => undecided.push((id, other)),
            }
        }
        if undecided.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(undecided.is_empty(), "undecided: {undecided:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = fired.0.lock().unwrap().clone();
    for i in 0..N {
        let id = format!("r-{i}");
        let ran = runs.get(&id).map_or(0, Vec::len);
        let was_met = met.contains(&id);
        assert!(
            (ran == 1) != was_met && ran <= 1,
            "{id}: handler ran {ran} times, met: {was_met}"
        );
    }
    let (n_met, n_fired) = (met.len(), runs.len());
    println!("{n_met} met, {n_fired} fired of {N}");
    assert!(
        n_met > 0 && n_fired > 0,
        "{n_met} met, {n_fired} fired: the race was not run"
    );
    orders.shutdown().await;
    payments.shutdown().await;
}

/// The instance that scheduled the deadlines is gone when they pass;
/// another instance, started later, runs each exactly once.
#[tokio::test]
async fn deadlines_outlive_the_instance_that_scheduled_them() {
    const N: usize = 20;
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let fired = Fired::default();
    let first = Service::new("orders")
        .state(fired.clone())
        .deadline(cancel_unpaid)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let web = Publisher::new(client.clone(), "web").unwrap();
    for i in 0..N {
        web.publish(&order(&format!("g-{i}"), None)).await.unwrap();
    }
    let mut scheduled = 0;
    for _ in 0..100 {
        scheduled = deadlines::pending(&js, "orders", "cancel_unpaid")
            .await
            .unwrap()
            .pending;
        if scheduled == N as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(scheduled, N as u64);
    first.shutdown().await;
    // They pass while no instance runs.
    tokio::time::sleep(Duration::from_millis(WITHIN_MS as u64 + 1000)).await;
    assert!(fired.0.lock().unwrap().is_empty());
    let second = Service::new("orders")
        .state(fired.clone())
        .deadline(cancel_unpaid)
        .start(client.clone())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "every deadline run", || {
        fired.0.lock().unwrap().len() == N
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = fired.0.lock().unwrap().clone();
    assert!(runs.values().all(|r| r.len() == 1), "{runs:?}");
    second.shutdown().await;
}

/// A hand-written handler whose `deadline()` says it is a deadline handler,
/// registered with `Service::handler`: refused at start. (The macro's
/// deadline handlers do not compile there:
/// `tests/ui/handler/deadline_as_plain_handler.rs`.)
struct HandWritten;

impl choreo::Handler for HandWritten {
    type Event = OrderPlaced;

    fn name(&self) -> &'static str {
        "hand_written"
    }

    fn deadline(&self) -> Option<choreo::Deadline> {
        choreo::Handler::deadline(&cancel_unpaid)
    }

    fn call(
        &self,
        _event: choreo::Envelope<OrderPlaced>,
        _ctx: &Context,
    ) -> choreo::__private::BoxFuture<Result<(), choreo::HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn a_deadline_handler_registered_as_a_plain_handler_is_refused() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let err = Service::new("orders")
        .handler(HandWritten)
        .start(client)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StartErrorKind::InvalidOptions);
    assert!(
        err.to_string()
            .contains("register it with `Service::deadline`"),
        "{err}"
    );
}

/// As `cancel_unpaid`, with time to kill a node while it is pending.
#[event_handler(within = "8s", unless = PaymentCaptured)]
async fn cancel_unpaid_slowly(order: OrderPlaced, ctx: Context, fired: State<Fired>) {
    fired
        .0
        .0
        .lock()
        .unwrap()
        .entry(order.order_id)
        .or_default()
        .push((ctx.event_id(), Some(ctx.correlation_id()), 0));
}

/// The deadline stream's leader dies while deadlines are pending, on a
/// 3-node cluster with R3 streams: the met ones stay met, each pending one
/// fires once on the new leader.
#[tokio::test]
async fn a_node_dying_loses_no_deadline_and_doubles_none() {
    const N: usize = 40;
    const H: &str = "cancel_unpaid_slowly";
    let mut cluster = choreo_testkit::NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let r3 = choreo::StreamSettings::default().replicas(3);
    let fired = Fired::default();
    let orders = Service::new("orders")
        .state(fired.clone())
        .stream_settings(r3.clone())
        .deadline(cancel_unpaid_slowly)
        .start(cluster.connect().await.unwrap())
        .await
        .unwrap();
    let payments = Service::new("payments")
        .stream_settings(r3.clone())
        .handler(pay)
        .start(cluster.connect().await.unwrap())
        .await
        .unwrap();
    let web = Publisher::new(client.clone(), "web")
        .unwrap()
        .stream_settings(r3);
    // Even orders pay at once, odd ones never.
    for i in 0..N {
        let pays = (i % 2 == 0).then_some(0);
        web.publish(&order(&format!("c-{i}"), pays)).await.unwrap();
    }
    // Wait until the even ones are met and the odd ones pending.
    let decided = |done: bool| {
        let js = js.clone();
        async move {
            let mut wrong = Vec::new();
            for i in 0..N {
                let id = format!("c-{i}");
                // Reads fail while the stream elects a leader.
                match (try_state(&js, H, &id).await, i % 2 == 0, done) {
                    (Ok(DeadlineState::Met { .. }), true, _)
                    | (Ok(DeadlineState::Scheduled { .. }), false, false)
                    | (Ok(DeadlineState::Fired { .. }), false, true) => {}
                    (other, ..) => wrong.push((id, format!("{other:?}"))),
                }
            }
            wrong
        }
    };
    let mut wrong = Vec::new();
    for _ in 0..50 {
        wrong = decided(false).await;
        if wrong.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wrong.is_empty(), "before the kill: {wrong:?}");
    let leader = cluster
        .wait_for_stream_leader(&client, "CHOREO_DEADLINES", Duration::from_secs(20))
        .await
        .unwrap();
    let leader = cluster.index_of(&leader).unwrap();
    cluster.kill(leader);
    for _ in 0..120 {
        wrong = decided(true).await;
        if wrong.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(wrong.is_empty(), "after the kill: {wrong:?}");
    eventually(
        Duration::from_secs(30),
        "every unpaid order cancelled",
        || fired.0.lock().unwrap().len() == N / 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = fired.0.lock().unwrap().clone();
    assert_eq!(runs.len(), N / 2, "{runs:?}");
    assert!(
        runs.iter()
            .all(|(id, r)| r.len() == 1 && id[2..].parse::<usize>().unwrap() % 2 == 1),
        "{runs:?}"
    );
    orders.shutdown().await;
    payments.shutdown().await;
}

/// A deadline service runs with exactly `Service::permissions()` (and what
/// its handler emits); an observer reads its deadlines with
/// `Permissions::observer`.
#[tokio::test]
async fn a_deadline_service_runs_with_its_documented_permissions() {
    use choreo::Permissions;
    let api = Default::default();
    let fired = Fired::default();
    let orders = || {
        Service::new("orders")
            .state(fired.clone())
            .deadline(cancel_unpaid)
    };
    let service = orders().permissions().publishes::<OrderCancelled>(&api);
    let web = Permissions::publisher("web", &api)
        .publishes::<OrderPlaced>(&api)
        .publishes::<PaymentCaptured>(&api);
    let config = format!(
        "authorization {{ users = [ \
           {{ user: orders, password: pw, permissions: {} }}, \
           {{ user: web, password: pw, permissions: {} }}, \
           {{ user: viewer, password: pw, permissions: {} }} ] }}",
        service.to_config(),
        web.to_config(),
        Permissions::observer(&api).to_config(),
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let url = server.url();
    let user = |name: &str| {
        let opts =
            choreo::async_nats::ConnectOptions::with_user_and_password(name.into(), "pw".into())
                .request_timeout(Some(Duration::from_secs(2)));
        choreo::connect(&url, opts)
    };
    let svc = orders().start(user("orders").await.unwrap()).await.unwrap();
    let web = Publisher::new(user("web").await.unwrap(), "web").unwrap();
    web.publish(&order("p-unpaid", None)).await.unwrap();
    let paid = order("p-paid", None);
    let a_meta = Metadata::root(&paid, "web").unwrap();
    web.publish_with(&paid, &a_meta).await.unwrap();
    let b = PaymentCaptured {
        order_id: "p-paid".into(),
    };
    web.publish_with(
        &b,
        &Metadata::emitted(&b, "web", &a_meta, "web.pay", 0).unwrap(),
    )
    .await
    .unwrap();
    let viewer = choreo::async_nats::jetstream::new(user("viewer").await.unwrap());
    let mut seen_pending = false;
    for _ in 0..75 {
        let p = deadlines::pending(&viewer, "orders", "cancel_unpaid")
            .await
            .unwrap();
        // 2 until the paid order's payment is seen.
        if p.pending >= 1 && p.next.is_some() {
            seen_pending = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_pending, "the viewer never saw the pending deadline");
    eventually(
        Duration::from_secs(10),
        "the unpaid order cancelled",
        || fired.0.lock().unwrap().contains_key("p-unpaid"),
    )
    .await;
    for _ in 0..50 {
        if matches!(
            try_state(&viewer, "cancel_unpaid", "p-paid").await.unwrap(),
            DeadlineState::Met { .. }
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        try_state(&viewer, "cancel_unpaid", "p-paid").await.unwrap(),
        DeadlineState::Met { .. }
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fired.0.lock().unwrap().len(), 1);
    assert_eq!(svc.stats("cancel_unpaid").unwrap().dead_lettered(), 0);
    svc.shutdown().await;
}

/// Attempts of the deadline handler per order, for the retry test.
#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<String, u32>>>);

/// Fails its first attempt for every order, then succeeds.
#[event_handler(within = "1s", unless = PaymentCaptured, backoff = ["100ms"])]
async fn cancel_unpaid_flaky(
    order: OrderPlaced,
    ctx: Context,
    attempts: State<Attempts>,
) -> Result<(), choreo::HandlerError> {
    let n = {
        let mut a = attempts.0.0.lock().unwrap();
        let n = a.entry(order.order_id.clone()).or_default();
        *n += 1;
        *n
    };
    if n == 1 {
        return Err(choreo::HandlerError::retryable("the first attempt fails"));
    }
    ctx.emit(OrderCancelled {
        order_id: order.order_id,
    });
    Ok(())
}

/// A deadline handler that fails is retried, and its decision stands: the
/// retry runs it (the decision is its own), once it succeeds never again.
#[tokio::test]
async fn a_failed_deadline_handler_is_retried_under_its_own_decision() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let attempts = Attempts::default();
    let svc = Service::new("orders")
        .state(attempts.clone())
        .deadline(cancel_unpaid_flaky)
        .start(client.clone())
        .await
        .unwrap();
    let web = Publisher::new(client.clone(), "web").unwrap();
    for i in 0..5 {
        web.publish(&order(&format!("f-{i}"), None)).await.unwrap();
    }
    let stats = svc.stats("cancel_unpaid_flaky").unwrap();
    eventually(
        Duration::from_secs(15),
        "five handled after a retry each",
        || stats.handled() == 5,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = attempts.0.lock().unwrap().clone();
    assert!(a.values().all(|n| *n == 2), "{a:?}");
    for i in 0..5 {
        let st = try_state(&js, "cancel_unpaid_flaky", &format!("f-{i}"))
            .await
            .unwrap();
        assert!(matches!(st, DeadlineState::Fired { .. }), "{st:?}");
    }
    let cancelled = common::stream_messages(&client, <OrderCancelled as choreo::Event>::STREAM)
        .await
        .into_iter()
        .filter(|m| m.subject.ends_with(".cancelled"))
        .count();
    assert_eq!(cancelled, 5);
    svc.shutdown().await;
}

/// A second A in the same flow starts no second deadline: one per token.
#[tokio::test]
async fn a_second_a_in_one_flow_starts_no_second_deadline() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let fired = Fired::default();
    let svc = Service::new("orders")
        .state(fired.clone())
        .deadline(cancel_unpaid)
        .start(client.clone())
        .await
        .unwrap();
    let web = Publisher::new(client.clone(), "web").unwrap();
    let first = order("s-1", None);
    let meta = Metadata::root(&first, "web").unwrap();
    web.publish_with(&first, &meta).await.unwrap();
    // Another order event caused by the first: the same correlation id.
    let second = order("s-2", None);
    web.publish_with(
        &second,
        &Metadata::emitted(&second, "web", &meta, "web.split", 0).unwrap(),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the flow's deadline fired", || {
        !fired.0.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(WITHIN_MS as u64 / 1000 + 1)).await;
    // One deadline for the flow: the A scheduled first holds it. The two
    // arrive together and are scheduled in parallel, so it may be either
    // (a CI run saw s-2's).
    let runs = fired.0.lock().unwrap().clone();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs.values().all(|r| r.len() == 1), "{runs:?}");
    svc.shutdown().await;
}
