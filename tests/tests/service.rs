//! Services and handlers against a real nats-server.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::{
    Attempt, Context, Envelope, EventId, HandlerError, Metadata, Publisher, Service, State, States,
    event, event_handler,
};
use choreo_testkit::{NatsServer, Recorder};
use common::eventually;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "payments.{order_id}.captured")]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "shipping.{order_id}.shipped")]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderShipped {
    pub order_id: String,
}

/// What handlers saw: handler name → (event id, attempt, metadata).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Sighting>>>);

type Sighting = (&'static str, Metadata, u32);

impl Seen {
    fn push(&self, who: &'static str, meta: &Metadata, attempt: u32) {
        self.0.lock().unwrap().push((who, meta.clone(), attempt));
    }
    fn count(&self, who: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _, _)| *w == who)
            .count()
    }
    fn all(&self, who: &str) -> Vec<(Metadata, u32)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _, _)| *w == who)
            .map(|(_, m, a)| (m.clone(), *a))
            .collect()
    }
}

#[event_handler]
async fn record_order(order: Envelope<OrderPlaced>, ctx: Context, State(seen): State<Seen>) {
    seen.push("record_order", order.meta(), ctx.attempt());
}

#[event_handler]
async fn record_order_b(order: Envelope<OrderPlaced>, State(seen): State<Seen>) {
    seen.push("record_order_b", order.meta(), 1);
}

#[event_handler]
async fn record_order_c(
    order: Envelope<OrderPlaced>,
    State(seen): State<Seen>,
    Attempt(a): Attempt,
) {
    seen.push("record_order_c", order.meta(), a);
}

/// Publishes orders `o-0` … `o-{n-1}`, each awaited.
async fn publish_orders(server: &NatsServer, n: usize) {
    let publisher = Publisher::new(server.connect().await.unwrap(), "checkout").unwrap();
    for i in 0..n {
        publisher
            .publish(&OrderPlaced {
                order_id: format!("o-{i}"),
                total_cents: 1,
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn three_services_fan_out_from_one_event() {
    let server = NatsServer::start().await.unwrap();
    let seen = Seen::default();
    let mut handles = Vec::new();
    for (svc, h) in [("billing", 0), ("audit", 1), ("mailer", 2)] {
        let s = Service::new(svc).state(seen.clone());
        let s = match h {
            0 => s.handler(record_order),
            1 => s.handler(record_order_b),
            _ => s.handler(record_order_c),
        };
        handles.push(s.start(server.connect().await.unwrap()).await.unwrap());
    }
    publish_orders(&server, 5).await;
    eventually(
        Duration::from_secs(10),
        "every service to see every order",
        || {
            seen.count("record_order") == 5
                && seen.count("record_order_b") == 5
                && seen.count("record_order_c") == 5
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.count("record_order") + seen.count("record_order_b") + seen.count("record_order_c"),
        15
    );
    for h in handles {
        h.shutdown().await;
    }
}

#[derive(Clone, Default)]
struct PerInstance(Arc<Mutex<HashMap<EventId, Vec<u8>>>>);

#[derive(Clone)]
struct InstanceId(u8);

#[event_handler(concurrency = 4)]
async fn work(
    order: Envelope<OrderPlaced>,
    State(log): State<PerInstance>,
    State(me): State<InstanceId>,
) {
    tokio::time::sleep(Duration::from_millis(2)).await;
    log.0
        .lock()
        .unwrap()
        .entry(order.meta().id())
        .or_default()
        .push(me.0);
}

#[tokio::test]
async fn two_instances_of_one_service_share_the_durable_and_handle_each_event_once() {
    let server = NatsServer::start().await.unwrap();
    let log = PerInstance::default();
    let a = Service::new("workers")
        .state(log.clone())
        .state(InstanceId(1))
        .handler(work);
    let b = Service::new("workers")
        .state(log.clone())
        .state(InstanceId(2))
        .handler(work);
    let a = a.start(server.connect().await.unwrap()).await.unwrap();
    let b = b.start(server.connect().await.unwrap()).await.unwrap();
    let n = 200;
    publish_orders(&server, n).await;
    eventually(Duration::from_secs(20), "all orders handled", || {
        log.0.lock().unwrap().len() == n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = log.0.lock().unwrap().clone();
    assert_eq!(log.len(), n);
    let twice: Vec<_> = log.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    let by_a = log.values().filter(|v| v[0] == 1).count();
    assert!(
        by_a > 0 && by_a < n,
        "both instances should take work, instance 1 took {by_a} of {n}"
    );
    assert_eq!(
        a.stats("work").unwrap().handled() + b.stats("work").unwrap().handled(),
        n as u64
    );
    a.shutdown().await;
    b.shutdown().await;
}

// ---- a three-hop chain ------------------------------------------------------

#[event_handler]
async fn charge(order: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
    Ok(())
}

#[event_handler]
async fn ship(payment: PaymentCaptured, ctx: Context) -> Result<(), HandlerError> {
    ctx.emit(OrderShipped {
        order_id: payment.order_id,
    });
    Ok(())
}

#[event_handler]
async fn delivered(e: Envelope<OrderShipped>, State(seen): State<Seen>) {
    seen.push("delivered", e.meta(), 1);
}

#[tokio::test]
async fn correlation_and_causation_travel_across_a_three_hop_chain() {
    let server = NatsServer::start().await.unwrap();
    let seen = Seen::default();
    let payments = Service::new("payments")
        .handler(charge)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let shipping = Service::new("shipping")
        .handler(ship)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let tracker = Service::new("tracker")
        .state(seen.clone())
        .handler(delivered)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    let publisher = Publisher::new(client.clone(), "checkout").unwrap();
    let root = publisher
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
            total_cents: 10,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the shipment", || {
        seen.count("delivered") == 1
    })
    .await;

    let payments_msgs = common::stream_messages(&client, "PAYMENTS").await;
    assert_eq!(payments_msgs.len(), 1);
    let captured = Envelope::<PaymentCaptured>::decode(
        &payments_msgs[0].subject,
        &payments_msgs[0].headers,
        &payments_msgs[0].payload,
    )
    .unwrap();
    assert_eq!(captured.meta().correlation_id(), root.event_id);
    assert_eq!(captured.meta().causation_id(), Some(root.event_id));
    assert_eq!(captured.meta().source(), "payments");
    assert_eq!(
        captured.meta().id(),
        EventId::emitted("payments.charge", root.event_id, "PaymentCaptured", 0)
    );

    let (shipped, _) = seen.all("delivered").remove(0);
    assert_eq!(shipped.correlation_id(), root.event_id);
    assert_eq!(shipped.causation_id(), Some(captured.meta().id()));
    assert_eq!(shipped.source(), "shipping");
    assert_eq!(
        shipped.id(),
        EventId::emitted("shipping.ship", captured.meta().id(), "OrderShipped", 0)
    );
    // The same flow through the testkit's recorder.
    let flow = recorder
        .quiescent(
            root.event_id,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    flow.assert_path(&["OrderPlaced", "PaymentCaptured", "OrderShipped"])
        .unwrap();
    flow.assert_caused_by::<OrderShipped, PaymentCaptured>()
        .unwrap();
    flow.assert_caused_by::<PaymentCaptured, OrderPlaced>()
        .unwrap();
    flow.assert_no_duplicates().unwrap();
    for h in [payments, shipping, tracker] {
        h.shutdown().await;
    }
}

// ---- long handlers, shutdown, unit calls ------------------------------------

#[event_handler(ack_wait = "1s", max_deliver = 3)]
async fn slow(order: Envelope<OrderPlaced>, ctx: Context, State(seen): State<Seen>) {
    seen.push("slow_start", order.meta(), ctx.attempt());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    ctx.emit(PaymentCaptured {
        order_id: order.order_id.clone(),
    });
    seen.push("slow_done", order.meta(), ctx.attempt());
}

/// A server, the `slow` handler running as service "slowpoke", and one order
/// published to it.
async fn start_slowpoke_with_one_order() -> (
    NatsServer,
    choreo::async_nats::Client,
    Seen,
    choreo::ServiceHandle,
) {
    let server = NatsServer::start().await.unwrap();
    let seen = Seen::default();
    let svc = Service::new("slowpoke")
        .state(seen.clone())
        .handler(slow)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let client = server.connect().await.unwrap();
    Publisher::new(client.clone(), "t")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o".into(),
            total_cents: 1,
        })
        .await
        .unwrap();
    (server, client, seen, svc)
}

#[tokio::test]
async fn in_progress_acks_keep_a_long_handler_from_redelivery() {
    let (_server, _client, seen, svc) = start_slowpoke_with_one_order().await;
    eventually(
        Duration::from_secs(15),
        "the slow handler to finish",
        || seen.count("slow_done") == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        seen.count("slow_start"),
        1,
        "3.5 s of work under a 1 s ack_wait was redelivered"
    );
    assert_eq!(seen.all("slow_start")[0].1, 1);
    assert_eq!(svc.stats("slow").unwrap().handled(), 1);
    svc.shutdown().await;
}

/// Invocations of `queued` running now, and the most seen at once.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<(usize, usize)>>);

#[event_handler(concurrency = 4, ack_wait = "1s", timeout = "3s", max_deliver = 3)]
async fn queued(
    order: Envelope<OrderPlaced>,
    ctx: Context,
    State(seen): State<Seen>,
    State(running): State<Running>,
) {
    {
        let mut r = running.0.lock().unwrap();
        r.0 += 1;
        r.1 = r.1.max(r.0);
    }
    seen.push("queued", order.meta(), ctx.attempt());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    running.0.lock().unwrap().0 -= 1;
}

/// A handler pulls a quarter more events than it runs at once; those wait
/// for a turn watched: the fifth event here waits 2.5 s, more than twice its
/// 1 s `ack_wait`, and is not redelivered (its in-progress acks went on),
/// and its 3 s timeout counts from its turn, not from its arrival (it would
/// have run 5 s by then). No more than `concurrency` run at once.
#[tokio::test]
async fn events_pulled_beyond_concurrency_wait_for_a_turn_watched() {
    let server = NatsServer::start().await.unwrap();
    let seen = Seen::default();
    let running = Running::default();
    let svc = Service::new("turns")
        .state(seen.clone())
        .state(running.clone())
        .handler(queued)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    publish_orders(&server, 5).await;
    // All five pulled at once: four running, one waiting for a turn.
    let js = choreo::async_nats::jetstream::new(server.connect().await.unwrap());
    let stream = <OrderPlaced as choreo::Event>::STREAM;
    let mut most_pending = 0;
    // Until the first four finish (2.5 s after they start); a loaded
    // machine may take a while to deliver them.
    for _ in 0..200 {
        let mut consumer: choreo::async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("turns--queued", stream)
            .await
            .unwrap();
        most_pending = most_pending.max(consumer.info().await.unwrap().num_ack_pending);
        if most_pending == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(most_pending, 5, "the headroom was not pulled");
    eventually(Duration::from_secs(15), "every event handled", || {
        svc.stats("queued").unwrap().handled() == 5
    })
    .await;
    let stats = svc.stats("queued").unwrap();
    assert_eq!(
        stats.timed_out(),
        0,
        "timed from arrival, not from its turn"
    );
    assert_eq!(seen.count("queued"), 5, "an event ran twice");
    assert!(seen.all("queued").iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(
        running.0.lock().unwrap().1,
        4,
        "more than concurrency ran at once"
    );
    svc.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_work_publishes_and_acks() {
    let (server, client, seen, svc) = start_slowpoke_with_one_order().await;
    eventually(Duration::from_secs(10), "the handler to start", || {
        seen.count("slow_start") == 1
    })
    .await;
    svc.shutdown().await;
    assert_eq!(
        seen.count("slow_done"),
        1,
        "shutdown returned before the running handler finished"
    );
    assert_eq!(
        common::stream_messages(&client, "PAYMENTS").await.len(),
        1,
        "its emission was published"
    );
    // Acked: a new instance does not get it again.
    let seen2 = Seen::default();
    let again = Service::new("slowpoke")
        .state(seen2.clone())
        .handler(slow)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(seen2.count("slow_start"), 0);
    again.shutdown().await;
}

#[tokio::test]
async fn a_handler_stays_callable_as_a_plain_async_fn() {
    let order = OrderPlaced {
        order_id: "o-9".into(),
        total_cents: 5,
    };
    let meta = Metadata::root(&order, "checkout").unwrap();
    let ctx = Context::for_test("payments", "charge", meta.clone(), States::default());
    charge(order, ctx.clone()).await.unwrap();
    assert_eq!(
        ctx.emitted::<PaymentCaptured>(),
        vec![PaymentCaptured {
            order_id: "o-9".into()
        }]
    );
    let emitted = ctx.take_emitted();
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].event_type, "PaymentCaptured");
    assert_eq!(emitted[0].subject, "payments.o-9.captured");
    assert_eq!(
        emitted[0].id,
        Some(EventId::emitted(
            "payments.charge",
            meta.id(),
            "PaymentCaptured",
            0
        ))
    );
    assert_eq!(
        ctx.idempotency_key(),
        format!("payments.charge:{}", meta.id())
    );
}

#[tokio::test]
async fn a_missing_state_fails_at_start_naming_the_type() {
    let server = NatsServer::start().await.unwrap();
    let err = Service::new("x")
        .handler(record_order)
        .start(server.connect().await.unwrap())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("record_order") && msg.contains("Seen") && msg.contains("Service::state"),
        "{msg}"
    );
}

#[tokio::test]
async fn bad_service_names_and_duplicate_handlers_fail_at_start() {
    let server = NatsServer::start().await.unwrap();
    for bad in ["", "has space", "dot.ted", "star*"] {
        let err = Service::new(bad)
            .start(server.connect().await.unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(err, choreo::StartError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = Service::new("dup")
        .state(Seen::default())
        .handler(record_order)
        .handler(record_order)
        .start(server.connect().await.unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("record_order"), "{err}");
}

#[tokio::test]
async fn durable_consumers_are_named_from_service_and_handler() {
    let server = NatsServer::start().await.unwrap();
    let svc = Service::new("payments")
        .handler(charge)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    let js = choreo::async_nats::jetstream::new(server.connect().await.unwrap());
    let stream = js.get_stream("ORDERS").await.unwrap();
    let mut c: choreo::async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("payments--charge").await.unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(info.config.filter_subject, "orders.*.placed");
    assert_eq!(
        info.config.max_deliver, 5,
        "deliveries are bounded by default"
    );
    assert_eq!(
        info.config.ack_policy,
        choreo::async_nats::jetstream::consumer::AckPolicy::Explicit
    );
    svc.shutdown().await;
}

#[derive(Clone, Default)]
struct Handled(Arc<Mutex<std::collections::HashSet<EventId>>>);

#[event_handler(concurrency = 2)]
async fn steady(order: Envelope<OrderPlaced>, State(done): State<Handled>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.0.lock().unwrap().insert(order.meta().id());
}

#[tokio::test]
async fn shutdown_hands_prefetched_events_back_at_once() {
    let server = NatsServer::start().await.unwrap();
    let done = Handled::default();
    let a = Service::new("steady")
        .state(done.clone())
        .handler(steady)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    publish_orders(&server, 12).await;
    eventually(
        Duration::from_secs(10),
        "the first instance to start",
        || !done.0.lock().unwrap().is_empty(),
    )
    .await;
    a.shutdown().await;
    // Events the first instance had pulled but not started come back now,
    // not after its 30 s ack_wait.
    let b = Service::new("steady")
        .state(done.clone())
        .handler(steady)
        .start(server.connect().await.unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "every event handled", || {
        done.0.lock().unwrap().len() == 12
    })
    .await;
    b.shutdown().await;
}

#[event_handler(concurrency = 2, max_deliver = 1)]
async fn steady_once(order: Envelope<OrderPlaced>, State(done): State<Handled>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.0.lock().unwrap().insert(order.meta().id());
}

/// With `max_deliver = 1` every delivery is the last: an event pulled but
/// never run, then handed back (nak'd) at shutdown, would be spent and
/// dead-lettered. A handler pulls only as many events as it can run, so a
/// shutdown with many events waiting dead-letters nothing.
#[tokio::test]
async fn shutdown_spends_no_delivery_attempt_on_events_never_run() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let done = Handled::default();
    let start = || {
        Service::new("steady")
            .state(done.clone())
            .handler(steady_once)
            .start(client.clone())
    };
    let a = start().await.unwrap();
    publish_orders(&server, 12).await;
    eventually(
        Duration::from_secs(10),
        "the first instance to start",
        || !done.0.lock().unwrap().is_empty(),
    )
    .await;
    let dead_a = a.stats("steady_once").unwrap().dead_lettered();
    a.shutdown().await;
    let b = start().await.unwrap();
    eventually(Duration::from_secs(15), "every event handled", || {
        done.0.lock().unwrap().len() == 12
    })
    .await;
    // A lost delivery would reach the dead-letter stream through its
    // advisory within a second or so; give it time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let letters = common::stream_messages(&client, choreo::dlq::DLQ_STREAM).await;
    assert_eq!(dead_a, 0);
    assert_eq!(
        letters.len(),
        0,
        "dead letters: {:?}",
        letters
            .iter()
            .map(|m| common::header(m, choreo::dlq::REASON))
            .collect::<Vec<_>>()
    );
    b.shutdown().await;
}

#[derive(Clone)]
struct Rate(u64);

#[event_handler]
async fn charge_at_rate(
    order: OrderPlaced,
    ctx: Context,
    State(rate): State<Rate>,
) -> Result<(), HandlerError> {
    if order.total_cents > rate.0 {
        return Err(HandlerError::permanent(std::io::Error::other(
            "above the limit",
        )));
    }
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
    Ok(())
}

#[tokio::test]
async fn a_handler_test_gives_each_state_once_and_reads_typed_emissions() {
    use choreo::testing::HandlerTest;
    let test = HandlerTest::new("payments").state(Rate(100));
    let ok = test
        .call(
            charge_at_rate,
            OrderPlaced {
                order_id: "o-1".into(),
                total_cents: 40,
            },
        )
        .await;
    assert!(ok.result.is_ok(), "{:?}", ok.result);
    assert_eq!(
        ok.emitted::<PaymentCaptured>(),
        vec![PaymentCaptured {
            order_id: "o-1".into()
        }]
    );
    assert_eq!(ok.emitted_events()[0].subject, "payments.o-1.captured");
    let refused = test
        .call(
            charge_at_rate,
            OrderPlaced {
                order_id: "o-2".into(),
                total_cents: 400,
            },
        )
        .await;
    assert!(refused.result.as_ref().unwrap_err().is_permanent());
    assert!(refused.emitted::<PaymentCaptured>().is_empty());
    // A state the test did not give fails like a service start would.
    let missing = HandlerTest::new("payments")
        .call(
            charge_at_rate,
            OrderPlaced {
                order_id: "o-3".into(),
                total_cents: 1,
            },
        )
        .await;
    let e = missing.result.unwrap_err();
    assert!(e.to_string().contains("Rate"), "{e}");
}
