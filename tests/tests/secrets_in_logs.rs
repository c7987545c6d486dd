//! Secrets never reach a log line or an error message. Alone in its test
//! binary: tracing's per-callsite interest cache is process-wide, and tests
//! running beside this one under no subscriber can leave callsites disabled.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;
#[path = "common/round_trip.rs"]
mod round_trip;

use choreo::async_nats::ConnectOptions;
use choreo::connect;
use choreo_testkit::NatsServer;
use round_trip::round_trip;

#[tokio::test(flavor = "current_thread")]
async fn secrets_never_reach_logs_or_errors() {
    // Everything choreo logs, at every level; async-nats at DEBUG (at TRACE it
    // logs the CONNECT message itself, credentials included: documented on
    // `choreo::connect`).
    let (captured, _guard) = common::capture_logs("trace,async_nats=debug");

    let secrets = ["pw-zebra-4471", "tok-quartz-8812"];
    let server = NatsServer::builder()
        .config(&format!(
            "authorization {{ users = [ {{ user: svc, password: \"{}\" }} ] }}",
            secrets[0]
        ))
        .start()
        .await
        .unwrap();
    let mut texts = Vec::new();
    // Wrong password in the URL, wrong password and token in options.
    let url = format!("nats://svc:{}x@127.0.0.1:{}", secrets[0], server.port());
    let token_url = format!("nats://{}@127.0.0.1:{}", secrets[1], server.port());
    let e = connect(&token_url, ConnectOptions::new())
        .await
        .unwrap_err();
    texts.push(format!("{e} {e:?}"));
    let e = connect(&url, ConnectOptions::new()).await.unwrap_err();
    texts.push(format!("{e} {e:?}"));
    let e = connect(&server.url(), ConnectOptions::with_token(secrets[1].into()))
        .await
        .unwrap_err();
    texts.push(format!("{e} {e:?}"));
    // A working service with the right password, publishing and handling.
    let client = connect(
        &server.url(),
        ConnectOptions::with_user_and_password("svc".into(), secrets[0].into()),
    )
    .await
    .unwrap();
    round_trip(client).await;
    let log = captured.text();
    assert!(log.contains("choreo.handle"), "the capture works: {log}");
    for secret in secrets {
        assert!(!log.contains(secret), "a secret reached the log");
        for t in &texts {
            assert!(
                !t.contains(secret),
                "a secret reached an error message: {t}"
            );
        }
    }
}
