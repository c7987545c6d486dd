//! How long choreo's streams keep events: a week by default for event
//! streams, for ever for dead letters, and a warning at start for a handler
//! whose oldest unhandled event is past half its stream's age, before the
//! stream removes it unread. Alone in its test binary: tracing's
//! per-callsite interest cache is process-wide.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use choreo::{DEFAULT_STREAM_MAX_AGE, Publisher, Service, StreamSettings, event, event_handler};
use choreo_testkit::NatsServer;
use common::{eventually, status_until};

#[event(subject = "visits.{page}.seen", key = (page, n))]
#[derive(Debug, Clone)]
pub struct VisitSeen {
    pub page: String,
    pub n: u32,
}

#[event_handler]
async fn tally(_v: VisitSeen) {}

/// Never finishes: what waits behind it only ages.
#[event_handler(ack_wait = "30s", timeout = "60s")]
async fn stuck(_v: VisitSeen) {
    std::future::pending::<()>().await;
}

/// Takes only events published after its durable was made.
#[event_handler(deliver = new)]
async fn notify(_v: VisitSeen) {}

async fn max_age(js: &choreo::async_nats::jetstream::Context, stream: &str) -> Duration {
    js.get_stream(stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .max_age
}

#[tokio::test]
async fn event_streams_keep_a_week_by_default_and_dead_letters_stay() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    assert_eq!(DEFAULT_STREAM_MAX_AGE, choreo::DEFAULT_INBOX_RETENTION);
    let publisher = Publisher::new(client.clone(), "web").unwrap();
    publisher
        .publish(&VisitSeen {
            page: "home".into(),
            n: 0,
        })
        .await
        .unwrap();
    assert_eq!(max_age(&js, "VISITS").await, DEFAULT_STREAM_MAX_AGE);
    let svc = Service::new("stats")
        .handler(tally)
        .start(client.clone())
        .await
        .unwrap();
    svc.shutdown().await;
    assert_eq!(max_age(&js, "CHOREO_DLQ").await, Duration::ZERO);
    assert_eq!(
        max_age(&js, "CHOREO_ADVISORIES").await,
        Duration::from_secs(7 * 86_400)
    );

    // Keeping every event is a choice made out loud; a short age is honoured
    // (and does not reach the dead letters).
    for age in [Duration::ZERO, Duration::from_secs(3600)] {
        let (_server, js) = started_with(StreamSettings::default().max_age(age)).await;
        assert_eq!(max_age(&js, "VISITS").await, age);
        assert_eq!(max_age(&js, "CHOREO_DLQ").await, Duration::ZERO);
    }
}

/// A new server on which the service has started once with `settings`.
async fn started_with(
    settings: StreamSettings,
) -> (NatsServer, choreo::async_nats::jetstream::Context) {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    Service::new("stats")
        .stream_settings(settings)
        .handler(tally)
        .start(client.clone())
        .await
        .unwrap()
        .shutdown()
        .await;
    (server, choreo::async_nats::jetstream::new(client))
}

#[tokio::test]
async fn a_handler_past_half_its_streams_age_is_warned_at_start() {
    let (captured, _guard) = common::capture_logs("warn");
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    // Events kept 6 s: a handler is behind once its oldest is 3 s old.
    let settings = StreamSettings::default().max_age(Duration::from_secs(6));
    let publisher = Publisher::new(client.clone(), "web")
        .unwrap()
        .stream_settings(settings.clone());
    let stats = || {
        Service::new("stats")
            .stream_settings(settings.clone())
            .handler(tally)
    };
    // The durable exists, then three young events wait for it: nothing to
    // say.
    stats()
        .start(client.clone())
        .await
        .unwrap()
        .shutdown()
        .await;
    publish_three(&publisher, 0).await;
    handles_three(&client, stats(), "tally").await;
    assert!(
        !captured.text().contains("is behind"),
        "warned about young events:\n{}",
        captured.text()
    );

    // Three more wait 3.5 s: past half the age, 2.5 s from being removed
    // (time enough to handle them on a slow machine).
    publish_three(&publisher, 3).await;
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    handles_three(&client, stats(), "tally").await;
    let text = captured.text();
    let line = text
        .lines()
        .find(|l| l.contains("handler tally is behind"))
        .unwrap_or_else(|| panic!("no warning about the late handler:\n{text}"));
    assert!(
        line.contains("service=\"stats\"")
            && line.contains("stream=\"VISITS\"")
            && line.contains("stream_sequence=4")
            && line.contains("pending=3")
            && line.contains("removed unread at 6.0 s (max_age)")
            && line.contains("StreamSettings::max_age"),
        "{line}"
    );

    // A `deliver = new` handler made now is not behind on the old events
    // its durable will never deliver: only its own three young ones wait.
    let notifier = || {
        Service::new("notifier")
            .stream_settings(settings.clone())
            .handler(notify)
    };
    notifier()
        .start(client.clone())
        .await
        .unwrap()
        .shutdown()
        .await;
    publish_three(&publisher, 6).await;
    handles_three(&client, notifier(), "notify").await;
    assert!(
        !captured.text().contains("handler notify is behind"),
        "warned about events before the durable:\n{}",
        captured.text()
    );
}

/// Publishes visits `from`, `from + 1` and `from + 2`.
async fn publish_three(publisher: &Publisher, from: u32) {
    for n in from..from + 3 {
        publisher
            .publish(&VisitSeen {
                page: "home".into(),
                n,
            })
            .await
            .unwrap();
    }
}

/// Starts `svc`, waits until its `handler` has handled three events, and
/// stops it.
async fn handles_three(client: &choreo::async_nats::Client, svc: Service, handler: &str) {
    let svc = svc.start(client.clone()).await.unwrap();
    let stats = svc.stats(handler).unwrap();
    eventually(Duration::from_secs(5), "three events handled", || {
        stats.handled() == 3
    })
    .await;
    svc.shutdown().await;
}

/// `choreo status` says how long the oldest waiting event has before its
/// stream removes it, and once that is under half the age, why.
#[tokio::test]
async fn status_says_when_the_oldest_waiting_event_is_removed() {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let settings = StreamSettings::default().max_age(Duration::from_secs(6));
    let publisher = Publisher::new(client.clone(), "web")
        .unwrap()
        .stream_settings(settings.clone());
    // A running instance that cannot keep up: its handler never ends.
    let svc = Service::new("slow")
        .stream_settings(settings)
        .handler(stuck)
        .start(client.clone())
        .await
        .unwrap();
    publish_three(&publisher, 0).await;
    let window = Duration::from_millis(200);
    let stuck_row =
        |s: &choreo::admin::Status| s.handlers.iter().find(|h| h.handler == "stuck").cloned();
    // The registry's bucket appears with the first heartbeat, just after
    // the service starts, and the oldest waiting event once it is read.
    let young = status_until(
        &js,
        window,
        Duration::from_secs(5),
        "the stuck handler",
        |s| stuck_row(s).is_some_and(|h| h.removed_in_seconds.is_some()),
    )
    .await;
    let young = stuck_row(&young).unwrap();
    let left = young.removed_in_seconds.unwrap();
    assert!((3.0..=6.0).contains(&left), "{young:?}");
    assert!(!young.reason.contains("removed unread"), "{young:?}");

    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let old = stuck_row(&choreo::admin::status(&js, window).await.unwrap()).unwrap();
    let left = old.removed_in_seconds.unwrap();
    assert!((0.0..3.0).contains(&left), "{old:?}");
    assert!(
        old.reason
            .contains("its oldest waiting event is removed unread in")
            && old.reason.contains("(stream VISITS's max_age)"),
        "{old:?}"
    );
    svc.abort();
}
