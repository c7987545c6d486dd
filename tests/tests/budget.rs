//! A service whose streams and inbox project past its server budget says so
//! at start, with what to change; one whose streams and inbox fit says
//! nothing. Alone in its test binary: tracing's per-callsite interest cache
//! is process-wide.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::{Publisher, Service, StreamSettings, event, event_handler};
use choreo_testkit::NatsServer;
use futures::StreamExt;

#[event(subject = "meters.{meter}.read", key = meter)]
#[derive(Clone, Debug)]
pub struct MeterRead {
    pub meter: u32,
}

#[event(subject = "meters.{meter}.paid", key = meter)]
#[derive(Clone, Debug)]
pub struct MeterPaid {
    pub meter: u32,
}

#[event_handler]
async fn bill(_m: MeterRead) {}

/// Chases a reading not paid within 15 minutes.
#[event_handler(within = "15m", unless = MeterPaid)]
async fn chase(_m: MeterRead) {}

/// 3,000 keyed events over a little more than a second: a rate the
/// projection can trust.
async fn fill(publisher: &Publisher) {
    let mut sends = futures::stream::iter(0..3000u32)
        .map(|meter| async move { publisher.publish(&MeterRead { meter }).await.unwrap() })
        .buffer_unordered(64);
    let mut n = 0;
    while sends.next().await.is_some() {
        n += 1;
        if n == 1500 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
}

/// What a service with a 64 MB budget warns at start, on a new server
/// whose meter stream (made with `stream`) holds `fill`'s history.
async fn warnings_at_start(
    captured: &common::Captured,
    stream: StreamSettings,
    service: impl FnOnce(Service) -> Service,
) -> String {
    captured.0.lock().unwrap().clear();
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let publisher = Publisher::new(client.clone(), "meters")
        .unwrap()
        .stream_settings(stream.clone());
    fill(&publisher).await;
    let svc = service(Service::new("billing"))
        .stream_settings(stream)
        .server_budget(64 << 20)
        .handler(bill)
        .start(client)
        .await
        .unwrap();
    svc.shutdown().await;
    captured.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_would_outgrow_the_budget_is_named_at_start_with_what_to_change() {
    let (captured, _guard) = common::capture_logs("warn");

    // Streams with their defaults keep a week: bounded, but a week at
    // ~2,000 events/s is far past the budget, and the warning says what
    // max_age fits.
    let text = warnings_at_start(&captured, StreamSettings::default(), |s| {
        s.inbox_groups(16).deadline(chase)
    })
    .await;
    let held_line = text
        .lines()
        .find(|l| l.contains("stream METERS keeps events up to its max_age 7.0 days"))
        .unwrap_or_else(|| panic!("no warning about the week-long stream:\n{text}"));
    assert!(
        held_line.contains("budget of 67.1 MB")
            && held_line.contains("days fits the budget")
            && held_line.contains("StreamSettings::max_age")
            && held_line.contains("service=\"billing\""),
        "{held_line}"
    );
    // ~2,000 events/s for 7 days over 16 groups: every record would
    // rewrite megabytes.
    let write_line = text
        .lines()
        .find(|l| l.contains("inbox groups will hold"))
        .unwrap_or_else(|| panic!("no warning about the inbox's writes:\n{text}"));
    assert!(
        write_line.contains("raise Service::inbox_groups") && write_line.contains("handler=bill"),
        "{write_line}"
    );

    // ~2,000 readings/s, each with a 15-minute deadline: gigabytes of
    // schedules and decisions.
    let deadline_line = text
        .lines()
        .find(|l| l.contains("deadline handler chase"))
        .unwrap_or_else(|| panic!("no warning about the deadlines:\n{text}"));
    assert!(
        deadline_line.contains("budget of 67.1 MB")
            && deadline_line.contains("Service::deadline_retention (1.0 days)")
            && deadline_line.contains("handler=chase"),
        "{deadline_line}"
    );

    // The same history in a stream that keeps every event.
    let forever = StreamSettings::default().max_age(Duration::ZERO);
    let text = warnings_at_start(&captured, forever, |s| {
        s.inbox_retention(Duration::from_secs(120))
    })
    .await;
    let stream_line = text
        .lines()
        .find(|l| l.contains("stream METERS keeps every event"))
        .unwrap_or_else(|| panic!("no warning about the unbounded stream:\n{text}"));
    assert!(
        stream_line.contains("StreamSettings::max_age")
            && stream_line.contains("budget of 67.1 MB")
            && stream_line.contains("service=\"billing\"")
            && stream_line.contains("of server memory"),
        "{stream_line}"
    );

    // The same history in a stream kept 30 s (shorter than the default
    // duplicate window, which is shortened to it), and a horizon of two
    // minutes over the default groups: nothing to say.
    let half_minute = StreamSettings::default().max_age(Duration::from_secs(30));
    let text = warnings_at_start(&captured, half_minute, |s| {
        s.inbox_retention(Duration::from_secs(120))
    })
    .await;
    assert!(
        !text.contains("keeps every event")
            && !text.contains("keeps events up to")
            && !text.contains("inbox groups will hold"),
        "warned about a bounded configuration:\n{text}"
    );
}
