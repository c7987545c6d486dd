//! A service, a publisher, the dead-letter reader and the testkit's
//! recorder all work through a JetStream domain, from a leaf node where
//! `$JS.API` reaches no JetStream: nothing in choreo hard-codes the local
//! API prefix.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "common/charging.rs"]
mod charging;
mod common;

use std::time::Duration;

use charging::{charge, order};
use choreo::async_nats::ConnectOptions;
use choreo::{JetStreamApi, Publisher, Service, StartErrorKind, connect, dlq};
use choreo_testkit::{NatsServer, Recorder};
use common::eventually;

/// A hub whose JetStream has domain `hub`, and a leaf node without
/// JetStream connected to it, with a client on the leaf: there, `$JS.API`
/// has no responder, and only `$JS.hub.API` reaches a JetStream.
async fn hub_and_leaf() -> (NatsServer, NatsServer, choreo::async_nats::Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hub = NatsServer::builder()
        .jetstream_domain("hub")
        .config(&format!("leafnodes {{ listen: \"127.0.0.1:{port}\" }}"))
        .start()
        .await
        .unwrap();
    let leaf = NatsServer::builder()
        .without_jetstream()
        .config(&format!(
            "leafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{port}\" }} ] }}"
        ))
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::new().request_timeout(Some(Duration::from_secs(2)));
    let client = connect(&leaf.url(), opts).await.unwrap();
    let js = JetStreamApi::domain("hub").context(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while js.query_account().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leaf did not reach the hub's JetStream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (hub, leaf, client)
}

#[tokio::test]
async fn a_service_and_a_publisher_run_through_a_jetstream_domain() {
    let (_hub, _leaf, client) = hub_and_leaf().await;
    let api = JetStreamApi::domain("hub");
    let recorder = Recorder::start_with(&client, &api).await.unwrap();
    let publisher = Publisher::new(client.clone(), "checkout")
        .unwrap()
        .jetstream(&api);
    // Published before the service starts, so its first pulls come in
    // batches whose keys the inbox reads with one batched direct get.
    let mut roots = Vec::new();
    for i in 0..200 {
        roots.push(publisher.publish(&order(i)).await.unwrap().event_id);
    }
    let svc = Service::new("payments")
        .jetstream(api.clone())
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    // The same event again: the inbox (read through the domain) skips it.
    publisher.publish(&order(1)).await.unwrap();
    let stats = svc.stats("charge").unwrap();
    eventually(
        Duration::from_secs(15),
        "199 handled and 1 dead letter",
        || stats.handled() == 199 && stats.dead_lettered() == 1,
    )
    .await;
    assert!(stats.inbox_batch_reads() >= 1, "no batched inbox read ran");
    assert_eq!(
        stats.inbox_batch_failures(),
        0,
        "a batched inbox read failed: it missed the domain"
    );
    let flow = recorder
        .quiescent(roots[3], Duration::from_millis(200), Duration::from_secs(5))
        .await
        .unwrap();
    flow.assert_path(&["OrderPlaced", "PaymentCaptured"])
        .unwrap();
    recorder
        .settled(&client, Duration::from_secs(10))
        .await
        .unwrap();
    let letters = dlq::list(&api.context(client.clone()), "payments", "charge")
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "permanent-error");
    assert_eq!(stats.handled(), 199, "the duplicate was handled again");
    svc.shutdown().await;
}

#[tokio::test]
async fn the_same_user_without_the_domain_is_refused() {
    // What makes the test above meaningful: on the leaf, `$JS.API` reaches
    // no JetStream.
    let (_hub, _leaf, client) = hub_and_leaf().await;
    let err = Service::new("payments")
        .handler(charge)
        .start(client)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StartErrorKind::Stream, "{err}");
    assert!(
        matches!(
            err,
            choreo::StartError::Stream(choreo::StreamError::JetStreamUnavailable { .. })
        ),
        "{err}"
    );
}
