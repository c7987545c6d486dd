//! The recorder and every flow assertion, passing and failing, against a
//! real server and real services.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use choreo::{Context, EventId, Publisher, Service, StreamSettings, event, event_handler};
use choreo_testkit::{NatsServer, Recorder, TestService};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured")]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.receipt")]
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptIssued {
    pub order_id: String,
}

#[event(subject = "shipping.{order_id}.shipped")]
#[derive(Debug, Clone, PartialEq)]
pub struct OrderShipped {
    pub order_id: String,
}

#[event(subject = "shipping.{order_id}.lost")]
#[derive(Debug, Clone, PartialEq)]
pub struct ParcelLost {
    pub order_id: String,
}

#[event_handler]
async fn charge(order: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: order.order_id.clone(),
    });
    ctx.emit(ReceiptIssued {
        order_id: order.order_id,
    });
}

#[event_handler]
async fn ship(payment: PaymentCaptured, ctx: Context) {
    ctx.emit(OrderShipped {
        order_id: payment.order_id,
    });
}

struct Shop {
    _server: NatsServer,
    recorder: Recorder,
    publisher: Publisher,
    _payments: TestService,
    _shipping: TestService,
}

async fn shop() -> Shop {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    let payments = TestService::start(client.clone(), || Service::new("payments").handler(charge))
        .await
        .unwrap();
    let shipping = TestService::start(client.clone(), || Service::new("shipping").handler(ship))
        .await
        .unwrap();
    let publisher = Publisher::new(client, "checkout").unwrap();
    Shop {
        _server: server,
        recorder,
        publisher,
        _payments: payments,
        _shipping: shipping,
    }
}

async fn place(shop: &Shop, id: &str) -> EventId {
    shop.publisher
        .publish(&OrderPlaced {
            order_id: id.into(),
        })
        .await
        .unwrap()
        .event_id
}

const SEC: Duration = Duration::from_secs(10);

#[tokio::test]
async fn expect_returns_the_typed_event_and_its_metadata_as_soon_as_it_arrives() {
    let shop = shop().await;
    let root = place(&shop, "o-1").await;
    let started = std::time::Instant::now();
    let shipped = shop
        .recorder
        .expect::<OrderShipped>()
        .matching(|e| e.order_id == "o-1")
        .within(SEC)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the wait ends when the event arrives"
    );
    assert_eq!(
        shipped.event,
        OrderShipped {
            order_id: "o-1".into()
        }
    );
    assert_eq!(shipped.meta.correlation_id(), root);
    assert_eq!(shipped.meta.source(), "shipping");
    assert_eq!(shipped.subject, "shipping.o-1.shipped");
    // in_flow narrows to one flow.
    shop.recorder
        .expect::<ReceiptIssued>()
        .in_flow(root)
        .within(SEC)
        .await
        .unwrap();
}

#[tokio::test]
async fn expect_fails_with_what_did_arrive() {
    let shop = shop().await;
    let root = place(&shop, "o-1").await;
    shop.recorder
        .quiescent(root, Duration::from_millis(300), SEC)
        .await
        .unwrap();
    let err = shop
        .recorder
        .expect::<OrderShipped>()
        .matching(|e| e.order_id == "o-2")
        .within(Duration::from_millis(300))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "expected a OrderShipped matching the predicate within 300ms, but none arrived"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("OrderPlaced [checkout]") && msg.contains("└─ OrderShipped [shipping]"),
        "{msg}"
    );
}

#[tokio::test]
async fn expect_none_passes_over_a_window_and_fails_naming_the_arrival() {
    let shop = shop().await;
    let root = place(&shop, "o-1").await;
    shop.recorder
        .expect_none::<ParcelLost>()
        .during(Duration::from_millis(300))
        .await
        .unwrap();
    let err = shop
        .recorder
        .expect_none::<OrderShipped>()
        .in_flow(root)
        .during(SEC)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("expected no OrderShipped within 10s, but"),
        "{msg}"
    );
    assert!(
        msg.contains("arrived from shipping") && msg.contains(&format!("flow {}", root.short())),
        "{msg}"
    );
}

#[tokio::test]
async fn flow_paths_causes_counts_and_duplicates() {
    let shop = shop().await;
    let root = place(&shop, "o-1").await;
    let flow = shop
        .recorder
        .quiescent(root, Duration::from_millis(300), SEC)
        .await
        .unwrap();
    assert_eq!(flow.len(), 4);
    flow.assert_path(&["OrderPlaced", "PaymentCaptured", "OrderShipped"])
        .unwrap();
    flow.assert_path(&["OrderPlaced", "ReceiptIssued"]).unwrap();
    flow.assert_caused_by::<OrderShipped, PaymentCaptured>()
        .unwrap();
    flow.assert_caused_by::<PaymentCaptured, OrderPlaced>()
        .unwrap();
    flow.assert_count::<PaymentCaptured>(1).unwrap();
    flow.assert_no_duplicates().unwrap();

    let err = flow
        .assert_path(&["OrderPlaced", "OrderShipped"])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("expected the path OrderPlaced → OrderShipped, but the flow's paths are: "),
        "{err}"
    );
    assert!(
        err.contains("OrderPlaced → PaymentCaptured → OrderShipped; OrderPlaced → ReceiptIssued"),
        "{err}"
    );
    let err = flow
        .assert_caused_by::<OrderShipped, OrderPlaced>()
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("expected every OrderShipped to be caused by a OrderPlaced, but"),
        "{err}"
    );
    assert!(err.contains("was caused by PaymentCaptured"), "{err}");
    let err = flow
        .assert_caused_by::<ParcelLost, OrderPlaced>()
        .unwrap_err()
        .to_string();
    assert!(err.contains("the flow has no ParcelLost"), "{err}");
    let err = flow
        .assert_count::<PaymentCaptured>(2)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("expected 2 PaymentCaptured, found 1"),
        "{err}"
    );
    assert!(err.contains("flow ") && err.contains("4 events"), "{err}");
}

#[tokio::test]
async fn a_fact_stored_twice_is_a_duplicate() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::streams(&client, &["ORDERS"]).await.unwrap();
    let publisher = Publisher::new(client, "checkout")
        .unwrap()
        .stream_settings(StreamSettings::default().duplicate_window(Duration::from_millis(200)));
    let order = OrderPlaced {
        order_id: "o-1".into(),
    };
    let root = publisher.publish(&order).await.unwrap().event_id;
    tokio::time::sleep(Duration::from_millis(400)).await;
    publisher.publish(&order).await.unwrap();
    let flow = recorder
        .quiescent(root, Duration::from_millis(200), SEC)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + SEC;
    let mut flow = flow;
    while flow.assert_no_duplicates().is_ok() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        flow = recorder.flow(root);
    }
    let err = flow.assert_no_duplicates().unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "expected no duplicate event ids, but these were stored more than once: {}",
            root.short()
        )),
        "{err}"
    );
    assert!(err.contains("1 event, 1 duplicate copy\n"), "{err}");
}

/// A copy a replay stored again carries `choreo-replay`: counted apart,
/// not a duplicate. The same copy without the mark is one.
#[tokio::test]
async fn a_replayed_copy_is_told_from_a_duplicate() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let recorder = Recorder::streams(&client, &["ORDERS"]).await.unwrap();
    let publisher = Publisher::new(client, "checkout").unwrap();
    let root = publisher
        .publish(&OrderPlaced {
            order_id: "o-2".into(),
        })
        .await
        .unwrap();
    let stored = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_raw_message(root.sequence)
        .await
        .unwrap();
    // As `choreo dlq replay` stores it: its own `Nats-Msg-Id`, the mark.
    let copy = |n: u32, mark: bool| {
        let mut h = stored.headers.clone();
        h.insert("Nats-Msg-Id", format!("copy:{n}"));
        if mark {
            h.insert(choreo::headers::CHOREO_REPLAY, "dlq 7");
        }
        h
    };
    let subject = stored.subject.to_string();
    js.publish_with_headers(subject.clone(), copy(1, true), stored.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let id = root.event_id;
    let mut flow = recorder.flow(id);
    let deadline = std::time::Instant::now() + SEC;
    while flow.replayed_copies().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        flow = recorder.flow(id);
    }
    assert_eq!(flow.replayed_copies(), &[id]);
    flow.assert_no_duplicates().unwrap();
    assert!(
        flow.tree().contains("1 event, 1 replayed copy\n"),
        "{}",
        flow.tree()
    );
    js.publish_with_headers(subject, copy(2, false), stored.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + SEC;
    while flow.assert_no_duplicates().is_ok() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        flow = recorder.flow(id);
    }
    let err = flow.assert_no_duplicates().unwrap_err().to_string();
    assert!(
        err.contains("1 event, 1 duplicate copy, 1 replayed copy\n"),
        "{err}"
    );
}

#[tokio::test]
async fn quiescence_fails_for_a_flow_that_never_started() {
    let shop = shop().await;
    let err = shop
        .recorder
        .quiescent(
            EventId::new_random(),
            Duration::from_millis(100),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("did not go quiet")
            && msg.contains("(nothing recorded for this correlation id)"),
        "{msg}"
    );
}

fn without_times(tree: &str) -> String {
    tree.lines()
        .map(|l| {
            l.rsplit_once(" +")
                .map_or(l.to_owned(), |(head, _)| head.to_owned())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_flow_renders_as_a_tree_and_as_a_mermaid_sequence_diagram() {
    let shop = shop().await;
    let root = place(&shop, "o-1").await;
    let flow = shop
        .recorder
        .quiescent(root, Duration::from_millis(300), SEC)
        .await
        .unwrap();
    let captured = EventId::emitted("payments.charge", root, "PaymentCaptured", 0);
    let receipt = EventId::emitted("payments.charge", root, "ReceiptIssued", 0);
    let shipped = EventId::emitted("shipping.ship", captured, "OrderShipped", 0);
    let tree = without_times(&flow.tree());
    // Siblings appear in emission order; both orders are legal when two
    // events share a timestamp.
    let a = format!(
        "flow {r}: 4 events\nOrderPlaced [checkout] {r}\n├─ PaymentCaptured [payments] {c}\n│  └─ OrderShipped [shipping] {s}\n└─ ReceiptIssued [payments] {p}",
        r = root.short(),
        c = captured.short(),
        s = shipped.short(),
        p = receipt.short()
    );
    let b = format!(
        "flow {r}: 4 events\nOrderPlaced [checkout] {r}\n├─ ReceiptIssued [payments] {p}\n└─ PaymentCaptured [payments] {c}\n   └─ OrderShipped [shipping] {s}",
        r = root.short(),
        c = captured.short(),
        s = shipped.short(),
        p = receipt.short()
    );
    assert!(tree == a || tree == b, "unexpected tree:\n{tree}");
    assert!(flow.tree().lines().nth(1).unwrap().ends_with("+0ms"));

    // Each arrow starts at the service that emitted its event and ends at
    // the service that reacted to it; a leaf is a note over its emitter.
    let mermaid = flow.mermaid();
    assert!(
        mermaid.starts_with(
            "sequenceDiagram\n    participant checkout\n    participant payments\n    participant shipping\n    checkout->>payments: OrderPlaced\n"
        ),
        "{mermaid}"
    );
    for line in [
        "    payments->>shipping: PaymentCaptured\n",
        "    Note over payments: ReceiptIssued\n",
        "    Note over shipping: OrderShipped\n",
    ] {
        assert!(mermaid.contains(line), "{line:?} missing from\n{mermaid}");
    }
    assert_eq!(mermaid.matches("->>").count(), 2, "{mermaid}");
}

#[tokio::test]
async fn a_one_event_flow_reads_in_the_singular() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    let root = Publisher::new(client, "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap()
        .event_id;
    let flow = recorder
        .quiescent(root, Duration::from_millis(200), SEC)
        .await
        .unwrap();
    assert!(
        flow.tree()
            .starts_with(&format!("flow {}: 1 event\n", root.short())),
        "{}",
        flow.tree()
    );
    assert!(
        flow.mermaid()
            .contains("    Note over checkout: OrderPlaced\n")
    );
}

#[tokio::test]
async fn settled_waits_until_every_consumer_is_drained_and_recorded() {
    let shop = shop().await;
    let client = shop.publisher.client().clone();
    let mut roots = Vec::new();
    for i in 0..20 {
        roots.push(place(&shop, &format!("o-{i}")).await);
    }
    shop.recorder.settled(&client, SEC * 2).await.unwrap();
    // Settled means done: every flow is complete at once, without waiting.
    for root in roots {
        let flow = shop.recorder.flow(root);
        assert_eq!(flow.len(), 4, "{}", flow.tree());
    }
}

#[tokio::test]
async fn settled_fails_naming_what_is_still_pending() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    // A handler whose service is stopped: its event stays pending.
    let mut payments =
        TestService::start(client.clone(), || Service::new("payments").handler(charge))
            .await
            .unwrap();
    payments.stop().await;
    Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap();
    let err = recorder
        .settled(&client, Duration::from_millis(500))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("consumer payments--charge on ORDERS has 1 pending"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wait_sees_an_event_recorded_just_before_it_started_waiting() {
    let shop = shop().await;
    // Many waits, each started while its event may be arriving: a lost
    // wake-up would make one of them take its full timeout.
    for i in 0..30 {
        let root = place(&shop, &format!("w-{i}")).await;
        let started = std::time::Instant::now();
        shop.recorder
            .expect::<OrderShipped>()
            .in_flow(root)
            .within(Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a wait took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn test_services_stop_crash_and_restart() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let recorder = Recorder::start(&client).await.unwrap();
    let mut payments =
        TestService::start(client.clone(), || Service::new("payments").handler(charge))
            .await
            .unwrap();
    let publisher = Publisher::new(client.clone(), "checkout").unwrap();
    payments.stop().await;
    assert!(!payments.is_running());
    let root = publisher
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap()
        .event_id;
    recorder
        .expect_none::<PaymentCaptured>()
        .during(Duration::from_millis(300))
        .await
        .unwrap();
    payments.restart().await.unwrap();
    recorder
        .expect::<PaymentCaptured>()
        .in_flow(root)
        .within(SEC)
        .await
        .unwrap();
    payments.crash();
    assert!(!payments.is_running());
    payments.restart().await.unwrap();
    assert_eq!(payments.handle().unwrap().name(), "payments");
}
