//! The `choreo` command against manifest files and against a real server's
//! registry: its output, its JSON, and its exit codes.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use choreo::{Context, Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event_handler(emits = [PaymentCaptured])]
async fn charge(o: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: o.order_id,
    });
}

#[event_handler(emits = [])]
async fn ship(_p: PaymentCaptured) {}

fn choreo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_choreo"))
}

/// Runs `choreo <args> --manifests <dir>`.
fn on_files(args: &[&str], dir: &tempfile::TempDir) -> std::process::Output {
    choreo()
        .args(args)
        .arg("--manifests")
        .arg(dir.path())
        .output()
        .unwrap()
}

fn services() -> Vec<Service> {
    vec![
        Service::new("payments").handler(charge),
        Service::new("shipping").handler(ship),
    ]
}

/// A folder with the services' manifests and a publisher of `OrderPlaced`
/// at `version`.
fn manifests(version: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for s in services() {
        let m = s.manifest();
        std::fs::write(dir.path().join(format!("{}.json", m.service)), m.to_json()).unwrap();
    }
    let publishers = serde_json::json!([{
        "source": "checkout",
        "event": {
            "event": "OrderPlaced", "version": version, "subject": "orders.{order_id}.placed",
            "subject_filter": "orders.*.placed", "stream": "ORDERS"
        },
        "first_published_at_ms": 0
    }]);
    std::fs::write(dir.path().join("publishers.json"), publishers.to_string()).unwrap();
    dir
}

#[test]
fn lint_passes_a_clean_choreography_and_fails_one_with_errors() {
    let clean = manifests(1);
    let out = on_files(&["lint"], &clean);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("2 services, 0 errors, 0 warnings"),
        "{stdout}"
    );

    let broken = manifests(2);
    let out = on_files(&["lint"], &broken);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an error fails the lint: {stdout}"
    );
    assert!(
        stdout.contains("error: checkout produces OrderPlaced version 2, but payments.charge accepts versions [1]"),
        "{stdout}"
    );
    // And as JSON for scripts.
    let out = on_files(&["lint", "--json"], &broken);
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(findings[0]["kind"], "VersionNotAccepted");
    assert_eq!(findings[0]["severity"], "Error");
}

#[test]
fn graph_draws_the_choreography_from_files() {
    let dir = manifests(1);
    let out = on_files(&["graph"], &dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("checkout -->|OrderPlaced| payments.charge"),
        "{stdout}"
    );
    assert!(
        stdout.contains("payments.charge -->|PaymentCaptured| shipping.ship"),
        "{stdout}"
    );
    let out = on_files(&["graph", "--dot"], &dir);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("digraph choreography {"));
}

#[tokio::test]
async fn graph_reads_the_registry_of_a_running_choreography() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let mut running = Vec::new();
    for s in services() {
        running.push(s.start(client.clone()).await.unwrap());
    }
    Publisher::new(client.clone(), "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap();
    // The publisher's record is written in the background.
    let mut stdout = String::new();
    for _ in 0..50 {
        let out = choreo()
            .args(["-s", &server.url(), "graph"])
            .output()
            .unwrap();
        stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.contains("checkout -->") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stdout.contains("checkout -->|OrderPlaced| payments.charge"),
        "{stdout}"
    );
    assert!(
        stdout.contains("payments.charge -->|PaymentCaptured| shipping.ship"),
        "{stdout}"
    );
    for r in running {
        r.shutdown().await;
    }
    // Every service stopped: graph, lint and asyncapi say that nothing runs
    // and how to read manifests instead, and do not pass with nothing.
    for args in [&["graph", "--mermaid"][..], &["lint"], &["asyncapi"]] {
        let out = choreo()
            .args(["-s", &server.url()])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("holds no live service") && stderr.contains("--manifests"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn an_unreachable_server_is_one_line_and_exit_code_2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = choreo()
        .args(["-s", &format!("nats://127.0.0.1:{port}"), "lint"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("choreo: cannot reach a NATS server at"),
        "{stderr}"
    );
}

#[test]
fn a_file_that_is_not_a_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.json"), "{\"hello\": 1}").unwrap();
    let out = on_files(&["lint"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("junk.json is neither a service manifest"),
        "{stderr}"
    );
}
