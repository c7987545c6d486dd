//! A started service cannot die silently: a dropped handle stops it
//! gracefully, and a failure it cannot recover from surfaces from
//! `ServiceHandle::wait` and `Service::run_until` as an error.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Publisher, RunError, Service, State, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;

#[event(subject = "tickets.{id}.opened", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct TicketOpened {
    pub id: String,
}

#[derive(Clone, Default)]
struct Counts {
    started: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
}

#[event_handler(backoff = ["200ms"], max_deliver = 100)]
async fn triage(t: TicketOpened, State(c): State<Counts>) {
    let _ = t;
    c.started.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.finished.fetch_add(1, Ordering::SeqCst);
}

fn service(counts: &Counts) -> Service {
    Service::new("helpdesk")
        .state(counts.clone())
        .handler(triage)
        .recovery_timeout(Duration::from_secs(1))
}

async fn open(client: &choreo::async_nats::Client, id: &str) {
    Publisher::new(client.clone(), "portal")
        .unwrap()
        .publish(&TicketOpened { id: id.into() })
        .await
        .unwrap();
}

async fn consumer_info(client: &choreo::async_nats::Client) -> jetstream::consumer::Info {
    let js = jetstream::new(client.clone());
    let mut c: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("helpdesk--triage", "TICKETS")
        .await
        .unwrap();
    c.info().await.unwrap().clone()
}

#[tokio::test]
async fn dropping_the_handle_stops_the_service_gracefully() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counts = Counts::default();
    let handle = service(&counts).start(client.clone()).await.unwrap();
    open(&client, "t-1").await;
    eventually(Duration::from_secs(5), "the handler to start", || {
        counts.started.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(handle);
    // The running handler finishes and its event is acked.
    eventually(Duration::from_secs(5), "the handler to finish", || {
        counts.finished.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = consumer_info(&client).await;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    // And nothing more is pulled.
    open(&client, "t-2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counts.started.load(Ordering::SeqCst), 1);
    assert_eq!(consumer_info(&client).await.num_pending, 1);
}

#[tokio::test]
async fn a_consumer_that_cannot_be_recreated_surfaces_from_wait() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counts = Counts::default();
    let mut handle = service(&counts).start(client.clone()).await.unwrap();
    jetstream::new(client.clone())
        .delete_stream("TICKETS")
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .expect("wait() returned")
        .unwrap_err();
    assert!(
        matches!(&err, RunError::ConsumerLost { handler, .. } if handler == "triage"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("helpdesk") && text.contains("could not be recreated"),
        "{text}"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test]
async fn an_inbox_bucket_gone_for_good_surfaces_from_run_until() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counts = Counts::default();
    let run = tokio::spawn(service(&counts).run_until(client.clone(), std::future::pending()));
    let js = jetstream::new(client.clone());
    // Wait for the service to have created its bucket, then delete it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while js.get_key_value("choreo_inbox_helpdesk").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "no inbox bucket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    js.delete_key_value("choreo_inbox_helpdesk").await.unwrap();
    open(&client, "t-1").await;
    let err = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("run_until returned")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, RunError::InboxLost { bucket, .. } if bucket == "choreo_inbox_helpdesk"),
        "{err:?}"
    );
    assert_eq!(
        counts.started.load(Ordering::SeqCst),
        0,
        "handled without an inbox"
    );
}

#[tokio::test]
async fn run_until_stops_gracefully_when_its_future_completes() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let counts = Counts::default();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(service(&counts).run_until(client.clone(), async {
        let _ = rx.await;
    }));
    open(&client, "t-1").await;
    eventually(Duration::from_secs(5), "the handler to start", || {
        counts.started.load(Ordering::SeqCst) == 1
    })
    .await;
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
    assert_eq!(
        counts.finished.load(Ordering::SeqCst),
        1,
        "finished before returning"
    );
}
