//! The testkit's own server handling, against the real binary.
#![allow(missing_docs, clippy::unwrap_used)]

use choreo_testkit::{NatsServer, TestkitError};

#[tokio::test]
async fn starts_on_a_free_port_with_jetstream_and_restarts_in_place() {
    let mut a = NatsServer::start().await.unwrap();
    let b = NatsServer::start().await.unwrap();
    assert_ne!(a.port(), b.port());
    let client = a.connect().await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("t.1", "x".into()).await.unwrap().await.unwrap();

    let port = a.port();
    a.kill();
    assert!(!a.is_running());
    a.restart().await.unwrap();
    assert_eq!(a.port(), port);
    let js = async_nats::jetstream::new(a.connect().await.unwrap());
    let mut stream = js.get_stream("T").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        1,
        "the store survives a restart"
    );
}

/// A port another process holds while the server is down is waited for:
/// the restart succeeds once it is let go, on the same port.
#[tokio::test]
async fn a_restart_waits_for_its_port_taken_meanwhile() {
    let mut a = NatsServer::start().await.unwrap();
    let port = a.port();
    a.kill();
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(holder);
    });
    a.restart().await.unwrap();
    release.join().unwrap();
    assert_eq!(a.port(), port);
    a.connect().await.unwrap();
}

#[tokio::test]
async fn a_bad_config_fails_with_the_log_tail() {
    let err = NatsServer::builder()
        .config("this is { not valid")
        .start()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TestkitError::StartFailed { .. }), "{msg}");
    assert!(
        msg.contains("did not start") && msg.contains("Parse error"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_missing_binary_says_how_to_get_one() {
    // Changing the environment of a multi-threaded test process is unsound
    // (`set_var` is unsafe), so the lookup runs in a child process.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--exact")
        .arg("probe_missing_binary")
        .arg("--ignored")
        .arg("--nocapture")
        .env("NATS_SERVER_BIN", "/nonexistent/nats-server")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PROBE: no nats-server binary found"),
        "{text}"
    );
    assert!(
        text.contains("scripts/test") && text.contains("NATS_SERVER_BIN"),
        "{text}"
    );
}

#[test]
#[ignore = "run by a_missing_binary_says_how_to_get_one in a child process"]
fn probe_missing_binary() {
    let err = choreo_testkit::find_binary().unwrap_err();
    println!("PROBE: {err}");
}
