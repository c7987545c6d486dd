//! Declared emissions: `#[event_handler(emits = [..])]` says what a handler
//! may emit. Emitting another type fails it permanently, naming the type and
//! the declaration; nothing is published. The declaration also completes
//! the service's permissions.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::testing::HandlerTest;
use choreo::{Context, Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;
use common::{dead_letters, eventually, header};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.declined", key = order_id)]
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentDeclined {
    pub order_id: String,
}

#[event(subject = "shipments.{order_id}.sent", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderShipped {
    pub order_id: String,
}

#[event_handler(emits = [PaymentCaptured, PaymentDeclined])]
async fn charge(order: OrderPlaced, ctx: Context) {
    if order.total_cents > 0 {
        ctx.emit(PaymentCaptured {
            order_id: order.order_id.clone(),
        });
    }
    if order.total_cents > 1_000 {
        // Not declared: the handler fails instead of shipping.
        ctx.emit(OrderShipped {
            order_id: order.order_id,
        });
    }
}

fn order(id: &str, total_cents: u64) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
        total_cents,
    }
}

#[tokio::test]
async fn a_declared_emission_goes_out_and_an_undeclared_one_fails_the_handler() {
    let ok = HandlerTest::new("payments")
        .call(charge, order("o-1", 10))
        .await;
    assert!(ok.result.is_ok());
    assert_eq!(
        ok.emitted::<PaymentCaptured>(),
        vec![PaymentCaptured {
            order_id: "o-1".into()
        }]
    );
    let bad = HandlerTest::new("payments")
        .call(charge, order("o-2", 5_000))
        .await;
    // The unit test fails the way the server does: permanently, emit-failed.
    let err = bad.result.as_ref().unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string().contains("emit-failed: ") && err.to_string().contains("OrderShipped"),
        "{err}"
    );
    let failures: Vec<String> = bad
        .emitted_events()
        .into_iter()
        .filter_map(|e| e.error)
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].contains("emitted OrderShipped"),
        "{}",
        failures[0]
    );
    assert!(
        failures[0].contains("emits = [PaymentCaptured, PaymentDeclined]"),
        "{}",
        failures[0]
    );
}

#[tokio::test]
async fn an_undeclared_emission_dead_letters_the_event_and_publishes_nothing() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let svc = Service::new("payments")
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "checkout").unwrap();
    publisher.publish(&order("o-1", 10)).await.unwrap();
    publisher.publish(&order("o-2", 5_000)).await.unwrap();
    let stats = svc.stats("charge").unwrap();
    eventually(
        Duration::from_secs(10),
        "one handled, one dead letter",
        || stats.handled() == 1 && stats.dead_lettered() == 1,
    )
    .await;
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], choreo::dlq::REASON).as_deref(),
        Some("emit-failed")
    );
    let detail = header(&letters[0], choreo::dlq::DETAIL).unwrap();
    assert!(detail.contains("OrderShipped"), "{detail}");
    assert!(detail.contains("does not declare"), "{detail}");
    // Neither of o-2's emissions went out: not its payment, not its shipment.
    let js = choreo::async_nats::jetstream::new(client.clone());
    let mut payments = js.get_stream("PAYMENTS").await.unwrap();
    assert_eq!(payments.info().await.unwrap().state.messages, 1);
    assert!(
        js.get_stream("SHIPMENTS").await.is_err(),
        "nothing was shipped"
    );
    svc.shutdown().await;
}

#[test]
fn declared_emissions_are_in_the_service_permissions() {
    let needs = Service::new("payments").handler(charge).permissions();
    let publish = needs.publish();
    for subject in [
        "payments.*.captured",
        "payments.*.declined",
        "$JS.API.STREAM.INFO.PAYMENTS",
    ] {
        assert!(
            publish.contains(&subject.to_owned()),
            "{subject} missing: {publish:?}"
        );
    }
    assert!(!publish.iter().any(|s| s.starts_with("shipments")));
}
