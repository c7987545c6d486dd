//! Startup failures say what is wrong and what to do.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use choreo::async_nats::ConnectOptions;
use choreo::{ConnectError, Service, StartError, StreamError, connect, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event_handler]
async fn on_order(_order: OrderPlaced) {}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = connect(&format!("nats://127.0.0.1:{port}"), ConnectOptions::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains("cannot reach") && msg.contains(&port.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn a_malformed_url_is_a_clear_error() {
    let err = connect("nats://127.0.0.1:notaport", ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err}");
    assert!(err.to_string().contains("expected e.g. nats://"), "{err}");
}

#[tokio::test]
async fn refused_credentials_are_a_clear_error_without_the_password() {
    let server = NatsServer::builder()
        .config("authorization { user: alice, password: right-horse-battery }")
        .start()
        .await
        .unwrap();
    let url = format!("nats://alice:wrong-staple-pw@127.0.0.1:{}", server.port());
    let err = connect(&url, ConnectOptions::new()).await.unwrap_err();
    let msg = format!("{err} {err:?}");
    assert!(matches!(err, ConnectError::Auth { .. }), "{msg}");
    assert!(
        !msg.contains("wrong-staple-pw") && !msg.contains("right-horse-battery"),
        "a password leaked: {msg}"
    );
    // The right credentials work.
    let ok = connect(
        &format!("nats://127.0.0.1:{}", server.port()),
        ConnectOptions::with_user_and_password("alice".into(), "right-horse-battery".into()),
    )
    .await;
    assert!(ok.is_ok());
}

#[tokio::test]
async fn a_server_without_jetstream_is_a_clear_error() {
    let server = NatsServer::builder()
        .without_jetstream()
        .start()
        .await
        .unwrap();
    let client = connect(&server.url(), ConnectOptions::new()).await.unwrap();
    let err = Service::new("orders")
        .handler(on_order)
        .start(client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            StartError::Stream(StreamError::JetStreamUnavailable { .. })
        ),
        "{msg}"
    );
    assert!(msg.contains("-js"), "{msg}");
}

#[tokio::test]
async fn a_permission_denial_names_the_subject() {
    let server = NatsServer::builder()
        .config(
            r#"authorization {
                 users = [
                   { user: svc, password: pw, permissions: { publish: { allow: [">"], deny: ["$JS.API.CONSUMER.CREATE.ORDERS.>"] } } }
                 ]
               }"#,
        )
        .start()
        .await
        .unwrap();
    let opts = ConnectOptions::with_user_and_password("svc".into(), "pw".into())
        .request_timeout(Some(Duration::from_secs(2)));
    let client = connect(&server.url(), opts).await.unwrap();
    let err = Service::new("orders")
        .handler(on_order)
        .start(client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StartError::Consumer { .. }), "{msg}");
    assert!(
        msg.contains("Permissions Violation") && msg.contains("$JS.API.CONSUMER.CREATE.ORDERS"),
        "{msg}"
    );
    assert!(msg.contains("orders--on_order"), "{msg}");
}

#[tokio::test]
async fn a_service_connects_from_a_url_and_options() {
    let server = NatsServer::builder()
        .config("authorization { token: \"t-0k\" }")
        .start()
        .await
        .unwrap();
    let handle = Service::new("orders")
        .handler(on_order)
        .connect_and_start(&server.url(), ConnectOptions::with_token("t-0k".into()))
        .await
        .unwrap();
    handle.shutdown().await;
    let err = Service::new("orders")
        .handler(on_order)
        .connect_and_start(&server.url(), ConnectOptions::with_token("wrong".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StartError::Connect(choreo::ConnectError::Auth { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn with_an_unbounded_start_timeout_a_start_waits_out_a_cluster_without_quorum() {
    let mut cluster = choreo_testkit::NatsCluster::start(3).await.unwrap();
    let client = cluster.connect().await.unwrap();
    // Two of three nodes down: JetStream has no quorum and every request
    // times out, as in an outage that outlasts the default 30 s.
    cluster.stop(1);
    cluster.stop(2);
    let starting = tokio::spawn(
        Service::new("payments")
            .handler(on_order)
            .stream_settings(choreo::StreamSettings::default().replicas(3))
            .start_timeout(Duration::MAX)
            .start(client.clone()),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    if starting.is_finished() {
        let res = starting.await.unwrap().map(|_| ());
        panic!("gave up while the errors were transient: {res:?}");
    }
    cluster.restart(1).await.unwrap();
    cluster.restart(2).await.unwrap();
    let svc = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .expect("started once the cluster was back")
        .unwrap()
        .unwrap();
    svc.shutdown().await;
}
