//! choreo's errors keep their causes and read well where a test prints
//! them: `{:?}` (what `#[tokio::test]` prints for a returned `Err`) is the
//! message, `{:#?}` adds the chain of sources, and `kind()` is matchable.
#![allow(missing_docs, clippy::unwrap_used)]

use std::error::Error as _;

use choreo::async_nats::ConnectOptions;
use choreo::{ConnectErrorKind, Service, StartError, StartErrorKind, connect};
use choreo_testkit::NatsServer;

#[tokio::test]
async fn an_unreachable_server_keeps_the_clients_error_as_its_source() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = ConnectOptions::new().connection_timeout(std::time::Duration::from_millis(500));
    let err = connect(&format!("nats://127.0.0.1:{port}"), opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Unreachable);
    let source = err.source().expect("the client's error is kept");
    assert!(
        source
            .downcast_ref::<choreo::async_nats::ConnectError>()
            .is_some()
    );
    // `{:?}` is the message a person can act on.
    assert_eq!(format!("{err:?}"), err.to_string());
    assert!(
        format!("{err:?}").contains("is nats-server running"),
        "{err:?}"
    );
    // `{:#?}` adds the causes.
    assert!(format!("{err:#?}").contains("caused by:"), "{err:#?}");
    // Through `StartError`, the chain goes on.
    let start: StartError = err.into();
    assert_eq!(start.kind(), StartErrorKind::Connect);
    assert!(!start.is_transient());
}

#[tokio::test]
async fn a_start_error_prints_its_message_and_says_whether_to_retry() {
    let server = NatsServer::start().await.unwrap();
    let err = Service::new("no spaces allowed")
        .start(server.connect().await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StartErrorKind::InvalidName);
    assert!(!err.is_transient());
    assert_eq!(format!("{err:?}"), err.to_string());
    assert!(err.to_string().contains("use 1 to 64 characters"), "{err}");
}

#[tokio::test]
async fn no_jetstream_is_a_stream_error_of_its_own_kind() {
    let server = NatsServer::builder()
        .without_jetstream()
        .start()
        .await
        .unwrap();
    let err = Service::new("payments")
        .start(server.connect().await.unwrap())
        .await
        .unwrap_err();
    match &err {
        StartError::Stream(s) => {
            assert_eq!(
                s.kind(),
                choreo::StreamErrorKind::JetStreamUnavailable,
                "{err}"
            );
            assert!(s.source().is_some(), "the server's answer is kept");
        }
        other => panic!("expected a stream error, got {other:#?}"),
    }
    assert!(!err.is_transient());
}
