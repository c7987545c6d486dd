//! The permissions contract: a service runs with exactly
//! `Service::permissions()` plus what its emissions need, a publisher with
//! `Permissions::publishes`, and the testkit's recorder with publish on
//! `$JS.API.>` and subscribe on `_INBOX.>` — and nothing is denied: events
//! are handled, the inbox answers batched reads, duplicates are compared
//! and skipped, and a permanent failure is dead-lettered.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "common/charging.rs"]
mod charging;
mod common;

use std::time::Duration;

use charging::{OrderPlaced, PaymentCaptured, charge, order};
use choreo::async_nats::ConnectOptions;
use choreo::{Permissions, Publisher, Service, connect, dlq};
use choreo_testkit::{NatsServer, Recorder};
use common::eventually;

fn payments() -> Service {
    Service::new("payments").handler(charge)
}

async fn user(server: &NatsServer, name: &str) -> choreo::async_nats::Client {
    let opts = ConnectOptions::with_user_and_password(name.into(), "pw".into())
        .request_timeout(Some(Duration::from_secs(2)));
    connect(&server.url(), opts).await.unwrap()
}

#[tokio::test]
async fn a_service_a_publisher_and_the_recorder_run_with_the_documented_permissions() {
    let api = Default::default();
    let service = payments().permissions().publishes::<PaymentCaptured>(&api);
    let checkout = Permissions::publisher("checkout", &api).publishes::<OrderPlaced>(&api);
    let recorder = r#"{ publish: { allow: ["$JS.API.>"] }, subscribe: { allow: ["_INBOX.>"] } }"#;
    let config = format!(
        "authorization {{ users = [ \
           {{ user: payments, password: pw, permissions: {} }}, \
           {{ user: checkout, password: pw, permissions: {} }}, \
           {{ user: recorder, password: pw, permissions: {recorder} }} ] }}",
        service.to_config(),
        checkout.to_config(),
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let recorder_client = user(&server, "recorder").await;
    let recorder = Recorder::start(&recorder_client).await.unwrap();

    // Orders first, so the service's first pulls read the inbox in batches.
    let publisher = Publisher::new(user(&server, "checkout").await, "checkout").unwrap();
    for i in 0..100 {
        publisher.publish(&order(i)).await.unwrap();
    }
    // The same fact again: JetStream reports a duplicate, which the
    // publisher compares with the stored copy (a read of the stream).
    let again = publisher.publish(&order(1)).await.unwrap();
    assert!(again.duplicate);
    // The publisher's record in the registry was allowed too.
    let js = choreo::async_nats::jetstream::new(recorder_client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while choreo::registry::publishers(&js)
        .await
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher could not record itself"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let svc = payments()
        .start(user(&server, "payments").await)
        .await
        .unwrap();
    let stats = svc.stats("charge").unwrap();
    eventually(
        Duration::from_secs(20),
        "99 handled and 1 dead letter",
        || stats.handled() == 99 && stats.dead_lettered() == 1,
    )
    .await;
    assert!(stats.inbox_batch_reads() >= 1);
    assert_eq!(
        stats.inbox_batch_failures(),
        0,
        "a batched inbox read was refused"
    );
    recorder
        .settled(&recorder_client, Duration::from_secs(10))
        .await
        .unwrap();
    let captured = recorder
        .snapshot()
        .iter()
        .filter(|r| r.meta.event_type() == "PaymentCaptured")
        .count();
    assert_eq!(captured, 99);
    // A redelivered copy is skipped through the inbox (a read and no write).
    svc.shutdown().await;
    let svc = payments()
        .start(user(&server, "payments").await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.stats("charge").unwrap().handled(), 0);
    svc.shutdown().await;

    let admin_view = dlq::list(
        &choreo::async_nats::jetstream::new(user(&server, "payments").await),
        "payments",
        "charge",
    )
    .await;
    // Listing letters is an operator's job, not the service's: it is denied.
    assert!(admin_view.is_err());
}

#[tokio::test]
async fn without_one_of_them_the_service_does_not_start() {
    // The set is not a formality: without the right to create its
    // consumer, start fails naming the subject.
    let allowed = payments()
        .permissions()
        .publishes::<PaymentCaptured>(&Default::default());
    let create = "$JS.API.CONSUMER.CREATE.ORDERS.payments--charge.>";
    assert!(allowed.publish().contains(&create.to_owned()));
    let rendered = allowed.to_config().replace(&format!("{create:?}, "), "");
    assert!(!rendered.contains(create));
    let config = format!(
        "authorization {{ users = [ {{ user: payments, password: pw, permissions: {rendered} }} ] }}"
    );
    let server = NatsServer::builder().config(&config).start().await.unwrap();
    let err = payments()
        .start_timeout(Duration::from_secs(3))
        .start(user(&server, "payments").await)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CONSUMER.CREATE.ORDERS"), "{err}");
}
