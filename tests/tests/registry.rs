//! The registry: `Service::manifest()` describes a service offline, and each
//! running instance keeps its record in `choreo_registry`: written at start,
//! refreshed every heartbeat, deleted on a graceful stop, stale after two
//! missed heartbeats when it crashed, and gone when the bucket's `max_age`
//! passes.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::async_nats::jetstream::{self, kv};
use choreo::registry::{self, Manifest};
use choreo::{Context, Service, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "orders.{order_id}.placed", key = order_id, name = "OrderPlaced")]
pub struct OrderPlacedV1 {
    pub order_id: String,
}

#[event(subject = "orders.{order_id}.placed", key = order_id, name = "OrderPlaced", version = 2, upcast_from = OrderPlacedV1)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

impl From<OrderPlacedV1> for OrderPlaced {
    fn from(v1: OrderPlacedV1) -> Self {
        Self {
            order_id: v1.order_id,
            total_cents: 0,
        }
    }
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event_handler(emits = [PaymentCaptured], max_deliver = 3, deliver = new)]
async fn charge(order: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
}

#[event_handler(idempotent = false)]
async fn audit(_order: OrderPlaced) {}

fn payments() -> Service {
    Service::new("payments").handler(charge).handler(audit)
}

#[test]
fn a_manifest_describes_the_service_without_a_server() {
    let m = payments().manifest();
    assert_eq!(m.service, "payments");
    assert_eq!(m.choreo_version, env!("CARGO_PKG_VERSION"));
    let h = &m.handlers[0];
    assert_eq!(h.durable, "payments--charge");
    assert_eq!(h.consumes.event, "OrderPlaced");
    assert_eq!(h.consumes.version, 2);
    assert_eq!(
        h.consumes.accepts_versions,
        vec![1, 2],
        "through upcast_from"
    );
    assert_eq!(h.consumes.subject_filter, "orders.*.placed");
    assert_eq!(h.consumes.stream, "ORDERS");
    let emits = h.emits.as_ref().unwrap();
    assert_eq!(emits[0].event, "PaymentCaptured");
    assert_eq!(emits[0].subject, "payments.{order_id}.captured");
    assert_eq!(h.options.max_deliver, 3);
    assert_eq!(h.options.deliver, "new");
    assert!(
        m.handlers[1].emits.is_none(),
        "audit's emissions are undeclared"
    );
    assert!(!m.handlers[1].options.idempotent);
    // JSON for CI, and back.
    let json = m.to_json();
    assert!(json.contains("\"accepts_versions\""), "{json}");
    let back: Manifest = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

async fn records(client: &choreo::async_nats::Client) -> Vec<registry::Instance> {
    registry::instances(&jetstream::new(client.clone()))
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn an_instance_is_listed_while_it_runs_and_gone_when_it_stops() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let svc = payments()
        .registry_heartbeat(Duration::from_millis(200))
        .start(client.clone())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let r = records(&client).await;
        if !r.is_empty() || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed.len(), 1, "{listed:?}");
    let me = &listed[0];
    assert_eq!(me.manifest, payments().manifest());
    assert_eq!(me.instance.len(), 16);
    // The system's host name, whether or not the shell exported HOSTNAME.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(me.host, host.trim());
    assert!(!me.stale(registry_now()), "a live instance is not stale");
    // Heartbeats move the record on.
    let first = me.heartbeat_at_ms;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(records(&client).await[0].heartbeat_at_ms > first);
    svc.shutdown().await;
    assert!(
        records(&client).await.is_empty(),
        "a graceful stop deletes the record"
    );
}

fn registry_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn a_crashed_instance_shows_as_stale_then_goes() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    // A bucket with a short max_age, made before any service (an existing
    // bucket keeps its configuration), so "goes" takes seconds, not a minute.
    jetstream::new(client.clone())
        .create_key_value(kv::Config {
            bucket: registry::BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let svc = payments()
        .registry_heartbeat(Duration::from_millis(300))
        .start(client.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(records(&client).await.len(), 1);
    svc.abort();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = records(&client).await;
    assert_eq!(after.len(), 1, "still listed after the crash");
    assert!(
        after[0].stale(registry_now()),
        "two heartbeats missed: stale"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(records(&client).await.is_empty(), "gone after max_age");
}

#[tokio::test]
async fn a_publisher_records_the_root_events_it_publishes_once_each() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = choreo::Publisher::new(client.clone(), "checkout").unwrap();
    for i in 0..5 {
        publisher
            .publish(&OrderPlaced {
                order_id: format!("o-{i}"),
                total_cents: 1,
            })
            .await
            .unwrap();
    }
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let recorded = loop {
        let r = registry::publishers(&js).await.unwrap_or_default();
        if !r.is_empty() || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].source, "checkout");
    assert_eq!(recorded[0].event.event, "OrderPlaced");
    assert_eq!(recorded[0].event.version, 2);
    assert_eq!(recorded[0].event.stream, "ORDERS");
    // Once per type: five publishes wrote one record.
    let store = js.get_key_value(registry::PUBLISHERS_BUCKET).await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.info.state.messages, 1);
}

/// A source that publishes two versions of one event keeps a record of
/// each, so `lint` sees both (0.1.0 kept only the last written). `flush`
/// waits for the records: read at once after it, they are there.
#[tokio::test]
async fn every_version_a_source_publishes_is_recorded_and_flush_waits_for_it() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = choreo::Publisher::new(client.clone(), "checkout").unwrap();
    publisher
        .publish(&OrderPlaced {
            order_id: "o-2".into(),
            total_cents: 1,
        })
        .await
        .unwrap();
    publisher
        .publish(&OrderPlacedV1 {
            order_id: "o-1".into(),
        })
        .await
        .unwrap();
    publisher.flush().await;
    let js = jetstream::new(client.clone());
    let recorded = read_publishers(&js).await.unwrap();
    let versions: Vec<(String, String, u32)> = recorded
        .iter()
        .map(|p| (p.source.clone(), p.event.event.clone(), p.event.version))
        .collect();
    assert_eq!(
        versions,
        vec![
            ("checkout".to_owned(), "OrderPlaced".to_owned(), 1),
            ("checkout".to_owned(), "OrderPlaced".to_owned(), 2),
        ]
    );
}

/// The registry's errors are errors: `?` takes them into `Box<dyn Error>`
/// (this does not compile where they are not).
async fn read_publishers(
    js: &jetstream::Context,
) -> Result<Vec<registry::PublishedEvent>, Box<dyn std::error::Error>> {
    Ok(registry::publishers(js).await?)
}

/// A program that publishes and exits at once: with `flush`, its record
/// is written before the runtime shuts down, and nothing is logged.
#[test]
fn a_short_lived_publisher_that_flushes_leaves_its_record_and_no_warning() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(NatsServer::start()).unwrap();
    let url = server.url();
    let (logs, _guard) = common::capture_logs("choreo=warn");
    for run in 0..3 {
        // A fresh runtime per run, dropped right after: a command's life.
        let cmd = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        cmd.block_on(async {
            let client = choreo::async_nats::connect(&url).await.unwrap();
            let p = choreo::Publisher::new(client, &format!("job-{run}")).unwrap();
            p.publish(&PaymentCaptured {
                order_id: format!("o-{run}"),
            })
            .await
            .unwrap();
            p.flush().await;
        });
        drop(cmd);
    }
    let recorded = rt.block_on(async {
        let js = jetstream::new(server.connect().await.unwrap());
        registry::publishers(&js).await.unwrap()
    });
    let sources: Vec<&str> = recorded.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(sources, vec!["job-0", "job-1", "job-2"], "{recorded:?}");
    assert!(
        !logs.text().contains("cannot record the publisher"),
        "{}",
        logs.text()
    );
}
