//! The inbox's server footprint is bounded by its group count: events flow
//! for many horizons and the bucket never holds more keys than groups, its
//! bytes stay flat, and every answer within the horizon is exact. Claims
//! expire on their own; a second instance with another group count is
//! refused.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use choreo::async_nats::jetstream;
use choreo::{Publisher, Service, State, StreamSettings, event, event_handler};
use choreo_testkit::NatsServer;
use common::eventually;
use futures::StreamExt;

#[event(subject = "parcels.{parcel}.sent", key = parcel)]
#[derive(Clone, Debug)]
pub struct ParcelSent {
    pub parcel: u32,
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicU32>);

#[event_handler(concurrency = 64)]
async fn track(_p: ParcelSent, State(c): State<Count>) {
    c.0.fetch_add(1, Ordering::SeqCst);
}

#[event_handler(ack_wait = "3s")]
async fn track_slowly(_p: ParcelSent, State(c): State<Count>) {
    tokio::time::sleep(Duration::from_millis(1800)).await;
    c.0.fetch_add(1, Ordering::SeqCst);
}

const GROUPS: u32 = 16;
const HORIZON: Duration = Duration::from_secs(2);

struct Setup {
    server: NatsServer,
    js: jetstream::Context,
    publisher: Publisher,
    settings: StreamSettings,
}

async fn setup() -> Setup {
    let server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    // A duplicate window far below the horizon, so a copy published again
    // is stored again and only the inbox can recognise it.
    let settings = StreamSettings::default().duplicate_window(Duration::from_millis(200));
    let publisher = Publisher::new(client.clone(), "depot")
        .unwrap()
        .stream_settings(settings.clone());
    Setup {
        js: jetstream::new(client),
        server,
        publisher,
        settings,
    }
}

async fn bucket_state(js: &jetstream::Context) -> (u64, u64) {
    let mut s = js.get_stream("KV_choreo_inbox_tracking").await.unwrap();
    let info = s.info().await.unwrap();
    (info.state.subjects_count, info.state.bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_stays_within_its_groups_for_many_horizons_and_answers_exactly() {
    let s = setup().await;
    let count = Count::default();
    let svc = Service::new("tracking")
        .stream_settings(s.settings.clone())
        .inbox_retention(HORIZON)
        .inbox_groups(GROUPS)
        .state(count.clone())
        .handler(track)
        .start(s.server.connect().await.unwrap())
        .await
        .unwrap();
    let per_wave = 200;
    let waves = 10u32; // one every horizon/2: five horizons
    let mut keys = Vec::new();
    let mut bytes = Vec::new();
    for wave in 0..waves {
        for i in 0..per_wave {
            let parcel = wave * per_wave + i;
            s.publisher.publish(&ParcelSent { parcel }).await.unwrap();
        }
        let handled = (wave + 1) * per_wave;
        eventually(Duration::from_secs(10), "the wave handled", || {
            count.0.load(Ordering::SeqCst) == handled
        })
        .await;
        // Within the horizon, a copy of an event just handled is
        // recognised (each wave's first parcel, published again once the
        // stream's duplicate window has passed, so it is stored again).
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.publisher
            .publish(&ParcelSent {
                parcel: wave * per_wave,
            })
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "the copy skipped", || {
            svc.stats("track").unwrap().skipped() == u64::from(wave + 1)
        })
        .await;
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            handled,
            "a copy inside the horizon ran again"
        );
        let (k, b) = bucket_state(&s.js).await;
        keys.push(k);
        bytes.push(b);
        tokio::time::sleep(HORIZON / 2).await;
    }
    eprintln!("keys after each wave: {keys:?}\nbytes after each wave: {bytes:?}");
    // Never false "already handled": every one of the 2,000 distinct events
    // ran, though each group holds ~125 of them over the run.
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        waves * per_wave,
        "an event was skipped as handled that never was"
    );
    // One key per group, not per event: 2,000 events, at most 16 keys.
    assert!(
        keys.iter().all(|k| *k <= u64::from(GROUPS)),
        "more keys than groups: {keys:?}"
    );
    // Flat: what a group holds is dropped once the horizon has passed, so
    // the later waves hold no more than the second did (a wave and the one
    // before it are within a horizon: ~400 records of 24 bytes). Kept for
    // ever, the 2,000 records would be over 48,000 bytes.
    let settled = *bytes[2..].iter().max().unwrap();
    assert!(
        settled < 2 * bytes[1],
        "the bucket grew: {bytes:?} bytes after each wave"
    );
    // Past the horizon a copy is new again (the horizon is the promise).
    tokio::time::sleep(HORIZON * 2).await;
    s.publisher
        .publish(&ParcelSent { parcel: 0 })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "a copy past the horizon handled",
        || count.0.load(Ordering::SeqCst) == waves * per_wave + 1,
    )
    .await;
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_group_count_is_refused_at_start() {
    let s = setup().await;
    let first = Service::new("tracking")
        .stream_settings(s.settings.clone())
        .inbox_groups(GROUPS)
        .state(Count::default())
        .handler(track)
        .start(s.server.connect().await.unwrap())
        .await
        .unwrap();
    let err = Service::new("tracking")
        .stream_settings(s.settings.clone())
        .inbox_groups(GROUPS * 2)
        .state(Count::default())
        .handler(track)
        .start(s.server.connect().await.unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kept in 16 groups") && err.contains("configured with 32"),
        "{err}"
    );
    assert!(err.contains("Service::inbox_groups(16)"), "{err}");
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_handlers_claim_leaves_the_server_on_its_own() {
    let s = setup().await;
    let count = Count::default();
    let svc = Service::new("tracking")
        .stream_settings(s.settings.clone())
        .inbox_groups(GROUPS)
        .state(count.clone())
        .handler(track_slowly)
        .start(s.server.connect().await.unwrap())
        .await
        .unwrap();
    let receipt = s
        .publisher
        .publish(&ParcelSent { parcel: 7 })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "handled", || {
        count.0.load(Ordering::SeqCst) == 1
    })
    .await;
    let kv = s.js.get_key_value("choreo_inbox_tracking").await.unwrap();
    let claim_key = choreo::__private::inbox_key("track_slowly", receipt.event_id);
    // The handler ran past a second, so its watchdog claimed the event,
    // with a TTL.
    let claim = kv.entry(&claim_key).await.unwrap().expect("a claim");
    assert!(claim.value.starts_with(b"run "), "{:?}", claim.value);
    let stream = s.js.get_stream("KV_choreo_inbox_tracking").await.unwrap();
    let raw = stream.direct_get(claim.revision).await.unwrap();
    let ttl = raw
        .headers
        .get("Nats-TTL")
        .map(|v| v.as_str().to_owned())
        .expect("the claim carries a Nats-TTL header");
    assert_eq!(ttl, "10s", "three ack_waits of 3 s, at least 10 s");
    // Recorded in its group, then the claim expires: only the group is
    // left on the server.
    let js = s.js.clone();
    assert!(
        choreo::__private::inbox_handled_at(&js, "tracking", "track_slowly", receipt.event_id)
            .await
            .is_some()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while kv.entry(&claim_key).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim is still on the server 20 s after it was written"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(bucket_state(&s.js).await.0, 1, "only the group key is left");
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_events_in_full_groups_are_all_recognised() {
    // 25,600 events over 256 groups: 100 records (about 2.4 KB) in each, so
    // one batched read of 256 events brings back up to 600 KB of groups,
    // and every record must be found in them.
    let s = setup().await;
    let count = Count::default();
    let svc = Service::new("tracking")
        .stream_settings(s.settings.clone())
        .inbox_groups(256)
        .state(count.clone())
        .handler(track)
        .start(s.server.connect().await.unwrap())
        .await
        .unwrap();
    let n = 25_600u32;
    let publish_all = || async {
        let mut sends = futures::stream::iter(0..n)
            .map(|parcel| {
                let p = s.publisher.clone();
                async move { p.publish(&ParcelSent { parcel }).await.unwrap() }
            })
            .buffer_unordered(256);
        while sends.next().await.is_some() {}
    };
    publish_all().await;
    eventually(Duration::from_secs(60), "every event handled", || {
        count.0.load(Ordering::SeqCst) == n
    })
    .await;
    // A record is written once its handler has returned: the last few
    // follow the count by a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = choreo::__private::inbox_records(&s.js, "tracking", "track")
            .await
            .unwrap();
        if records == u64::from(n) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{records} of {n} records 10 s after the last handler returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_all().await;
    eventually(Duration::from_secs(60), "every copy skipped", || {
        svc.stats("track").unwrap().skipped() == u64::from(n)
    })
    .await;
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        n,
        "a copy of a recorded event ran again"
    );
    assert!(
        svc.stats("track").unwrap().inbox_batch_reads() > 0,
        "the copies were read in batches"
    );
    svc.shutdown().await;
}

#[event_handler(concurrency = 16)]
async fn track_with_others(_p: ParcelSent, State(c): State<Count>) {
    c.0.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_writing_the_same_few_groups_lose_no_record() {
    // Four groups and two instances with 16 events in flight each: nearly
    // every record's compare-and-set races another, and each conflict is
    // re-read from the leader and written again.
    let s = setup().await;
    let count = Count::default();
    let start = || async {
        Service::new("tracking")
            .stream_settings(s.settings.clone())
            .inbox_groups(4)
            .state(count.clone())
            .handler(track_with_others)
            .start(s.server.connect().await.unwrap())
            .await
            .unwrap()
    };
    // The events wait first, so both instances start on a full backlog.
    let n = 400u32;
    for parcel in 0..n {
        s.publisher.publish(&ParcelSent { parcel }).await.unwrap();
    }
    let (a, b) = tokio::join!(start(), start());
    let handled = || {
        a.stats("track_with_others").unwrap().handled()
            + b.stats("track_with_others").unwrap().handled()
    };
    eventually(Duration::from_secs(60), "every event handled", || {
        handled() == u64::from(n)
    })
    .await;
    assert_eq!(
        choreo::__private::inbox_records(&s.js, "tracking", "track_with_others")
            .await
            .unwrap(),
        u64::from(n),
        "a record was lost between racing writers"
    );
    let conflicts = a.stats("track_with_others").unwrap().inbox_conflicts()
        + b.stats("track_with_others").unwrap().inbox_conflicts();
    assert!(conflicts > 0, "the racing writers' conflicts are counted");
    // Every one of them is recognised afterwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ran = count.0.load(Ordering::SeqCst);
    for parcel in 0..n {
        s.publisher.publish(&ParcelSent { parcel }).await.unwrap();
    }
    let skipped = || {
        a.stats("track_with_others").unwrap().skipped()
            + b.stats("track_with_others").unwrap().skipped()
    };
    eventually(Duration::from_secs(60), "every copy skipped", || {
        skipped() == u64::from(n)
    })
    .await;
    assert_eq!(count.0.load(Ordering::SeqCst), ran, "a copy ran again");
    a.shutdown().await;
    b.shutdown().await;
}
