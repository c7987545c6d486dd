//! The server's consumer config is the truth: a durable an operator
//! deletes is recreated just after its ack floor, and during a rolling
//! deploy every instance follows the settings the server holds.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{HandlerError, Publisher, Service, State, dlq, event, event_handler};
use choreo_testkit::NatsServer;
use common::{dead_letters, eventually, header};

#[event(subject = "invoices.{id}.issued", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct InvoiceIssued {
    pub id: String,
    pub fail: bool,
}

#[derive(Clone, Default)]
struct Calls(Arc<AtomicU32>);

#[event_handler(name = "book", ack_wait = "1s", max_deliver = 5, backoff = ["100ms"])]
async fn book_v1(i: InvoiceIssued, State(c): State<Calls>) -> Result<(), HandlerError> {
    c.0.fetch_add(1, Ordering::SeqCst);
    if i.fail {
        return Err(std::io::Error::other("ledger refused").into());
    }
    Ok(())
}

#[event_handler(name = "book", ack_wait = "1s", max_deliver = 2, backoff = ["100ms"])]
async fn book_v2(i: InvoiceIssued, State(c): State<Calls>) -> Result<(), HandlerError> {
    c.0.fetch_add(1, Ordering::SeqCst);
    if i.fail {
        return Err(std::io::Error::other("ledger refused").into());
    }
    Ok(())
}

async fn issue(publisher: &Publisher, id: &str, fail: bool) {
    publisher
        .publish(&InvoiceIssued {
            id: id.into(),
            fail,
        })
        .await
        .unwrap();
}

async fn consumer_info(client: &choreo::async_nats::Client) -> jetstream::consumer::Info {
    let mut c: jetstream::consumer::PullConsumer = jetstream::new(client.clone())
        .get_consumer_from_stream("billing--book", "INVOICES")
        .await
        .unwrap();
    c.info().await.unwrap().clone()
}

#[tokio::test]
async fn a_durable_deleted_by_an_operator_is_recreated_just_after_its_ack_floor() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "sales").unwrap();
    let calls = Calls::default();
    let svc = Service::new("billing")
        .state(calls.clone())
        .handler(book_v1)
        .start(client.clone())
        .await
        .unwrap();
    for i in 0..5 {
        issue(&publisher, &format!("i-{i}"), false).await;
    }
    let stats = || svc.stats("book").unwrap();
    eventually(Duration::from_secs(5), "five handled", || {
        stats().handled() == 5
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while consumer_info(&client).await.ack_floor.stream_sequence < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ack floor never reached 5"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The runtime reads the consumer back every second (ack_wait 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    jetstream::new(client.clone())
        .get_stream("INVOICES")
        .await
        .unwrap()
        .delete_consumer("billing--book")
        .await
        .unwrap();
    for i in 5..8 {
        issue(&publisher, &format!("i-{i}"), false).await;
    }
    eventually(
        Duration::from_secs(15),
        "the three new ones handled",
        || stats().handled() == 8,
    )
    .await;
    assert_eq!(
        stats().skipped(),
        0,
        "the recreated durable delivered acknowledged events again"
    );
    assert_eq!(calls.0.load(Ordering::SeqCst), 8);
    let info = consumer_info(&client).await;
    assert_eq!(info.ack_floor.stream_sequence, 8);
    svc.shutdown().await;
}

#[tokio::test]
async fn in_a_rolling_deploy_every_instance_follows_the_consumer_the_server_holds() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "sales").unwrap();
    let calls = Calls::default();
    // The old version runs with max_deliver 5 ...
    let old = Service::new("billing")
        .state(calls.clone())
        .handler(book_v1)
        .start(client.clone())
        .await
        .unwrap();
    // ... the new one starts with 2 and writes it to the durable, then goes
    // (a deploy rolled back, or not yet scaled up): only the old one pulls.
    Service::new("billing")
        .state(calls.clone())
        .handler(book_v2)
        .start(server.connect().await.unwrap())
        .await
        .unwrap()
        .shutdown()
        .await;
    assert_eq!(consumer_info(&client).await.config.max_deliver, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    issue(&publisher, "bad", true).await;
    let letters = dead_letters(&client, 1, Duration::from_secs(10)).await;
    // The old instance followed the server: it dead-lettered on the 2nd
    // delivery itself, with the handler's error (not as a lost delivery
    // after JetStream stopped redelivering at 2).
    assert_eq!(
        header(&letters[0], dlq::REASON).as_deref(),
        Some("max-deliver-exceeded")
    );
    assert_eq!(header(&letters[0], dlq::DELIVERIES).as_deref(), Some("2"));
    assert!(
        header(&letters[0], dlq::DETAIL)
            .unwrap()
            .contains("ledger refused")
    );
    assert_eq!(calls.0.load(Ordering::SeqCst), 2);
    old.shutdown().await;
}
