//! Logs a production system keeps are enough: at `warn`, every warning or
//! error about an event carries its identity as fields of the line itself.
//! Alone in its test binary: tracing's per-callsite interest cache is
//! process-wide.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::async_nats::{HeaderMap, jetstream};
use choreo::{HandlerError, Metadata, Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "audits.{id}.requested", key = id)]
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRequested {
    pub id: String,
    pub mode: String,
}

#[event_handler(max_deliver = 2, backoff = ["100ms"])]
async fn audit(a: AuditRequested) -> Result<(), HandlerError> {
    match a.mode.as_str() {
        "permanent" => Err(HandlerError::permanent(std::io::Error::other("bad audit"))),
        "fail" => Err(std::io::Error::other("ledger down").into()),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_warning_about_an_event_names_it_on_the_line_itself() {
    let (captured, _guard) = common::capture_logs("warn");

    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let svc = Service::new("auditor")
        .handler(audit)
        .start(client.clone())
        .await
        .unwrap();
    let publisher = Publisher::new(client.clone(), "books").unwrap();
    for (id, mode) in [("a1", "permanent"), ("a2", "fail")] {
        publisher
            .publish(&AuditRequested {
                id: id.into(),
                mode: mode.into(),
            })
            .await
            .unwrap();
    }
    // Undecodable: valid headers, a payload that is not CBOR.
    let headers: HeaderMap = Metadata::root(
        &AuditRequested {
            id: "a3".into(),
            mode: "ok".into(),
        },
        "raw",
    )
    .unwrap()
    .to_headers();
    jetstream::new(client.clone())
        .publish_with_headers("audits.a3.requested", headers, vec![0xff, 0x00].into())
        .await
        .unwrap()
        .await
        .unwrap();
    common::dead_letters(&client, 3, Duration::from_secs(10)).await;
    svc.shutdown().await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" choreo::") && (l.contains(" WARN ") || l.contains(" ERROR ")))
        .collect();
    for needle in [
        "handler failed permanently",
        "failed on the last allowed delivery",
        "cannot decode the event",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no warning saying {needle:?} in:\n{text}"
        );
    }
    for line in &lines {
        for field in [
            "service=auditor",
            "handler=audit",
            "event_type=AuditRequested",
            "event_id=",
            "subject=audits.",
            "attempt=",
        ] {
            assert!(line.contains(field), "{field} missing from: {line}");
        }
        assert!(!line.contains("event_id=-"), "no event id on: {line}");
    }
}
