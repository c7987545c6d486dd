//! The `choreo.consumer.lag` gauge against a real server: set from each
//! delivery's pending count with no request of its own, it follows the
//! consumer's `num_pending` as a slow handler works through a backlog, and
//! reads 0 once the backlog is gone.
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Publisher, Service, event, event_handler};
use choreo_testkit::NatsServer;

#[event(subject = "gauge.{n}.ticked", key = n)]
pub struct Ticked {
    pub n: u64,
}

#[event_handler(emits = [], concurrency = 1, idempotent = false)]
async fn slow(_t: Ticked) {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_lag_gauge_follows_num_pending_through_a_backlog() {
    let probe = choreo_testkit::GaugeProbe::install(choreo::observe::LAG).unwrap();
    let gauge = || probe.value().unwrap_or(f64::NAN);
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "ticker").unwrap();
    for n in 0..30 {
        publisher.publish(&Ticked { n }).await.unwrap();
    }
    let svc = Service::new("gauge")
        .handler(slow)
        .start(client.clone())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stream = js.get_stream_no_info("GAUGE").await.unwrap();
    // One event at a time, 100 ms each: between deliveries the server's
    // figure and the gauge agree.
    let mut compared = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = gauge();
        let pending = stream
            .consumer_info("gauge--slow")
            .await
            .unwrap()
            .num_pending as f64;
        let after = gauge();
        if before.is_nan() || pending == 0.0 {
            continue;
        }
        let off = (pending - before).abs().min((pending - after).abs());
        assert!(off <= 1.0, "gauge {before}/{after}, num_pending {pending}");
        compared += 1;
    }
    assert!(
        compared >= 10,
        "only {compared} samples taken during the backlog"
    );
    for _ in 0..100 {
        if gauge() == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gauge(), 0.0, "the last delivery had nothing behind it");
    svc.shutdown().await;
}
