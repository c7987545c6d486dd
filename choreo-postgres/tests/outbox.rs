//! The outbox seen and steered from NATS: a row the stream refuses is kept
//! with its reason and retried without holding up the rows behind it; the
//! relay reports pending rows, the oldest one's age and the last error in
//! the registry (`choreo status`), and `choreo lint` flags a relay that
//! could publish after a stream's duplicate window.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use choreo::admin::{self, FindingKind, Severity};
use choreo::async_nats::jetstream;
use choreo::{Context, Publisher, Service, StreamSettings, event_handler, registry};
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Postgres, PostgresOptions};
use choreo_testkit::{NatsServer, PostgresServer};
use common::{OrderPlaced, PaymentCaptured};

#[event_handler(idempotent = false, emits = PaymentCaptured)]
async fn charge(order: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A nats-server and a Postgres for one test, a client, its JetStream and
/// a pool with the `charges` table.
async fn servers() -> (
    NatsServer,
    PostgresServer,
    choreo::async_nats::Client,
    jetstream::Context,
    PgPool,
) {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let pool = common::pool(&pg.url()).await;
    (nats, pg, client, js, pool)
}

/// A row as a process that died after its commit leaves it.
async fn leave_row(pool: &PgPool, subject: &str) {
    sqlx::query(
        "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload, created_at)
         VALUES (gen_random_uuid(), 'PaymentCaptured', $1, '[]', '\\x7b7d', now() - interval '1 minute')",
    )
    .bind(subject)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_is_kept_with_its_reason_and_shown_and_the_rows_behind_it_go_on() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let publisher = Publisher::new(client.clone(), "payments").unwrap();
    // The payments stream exists once something was published to it.
    publisher
        .publish(&PaymentCaptured {
            order_id: "first".into(),
        })
        .await
        .unwrap();
    let _postgres = Postgres::start_with(
        pool.clone(),
        &publisher,
        PostgresOptions::default()
            .relay_delay(Duration::from_millis(500))
            .relay_every(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    // The refused row first: no stream takes its subject.
    leave_row(&pool, "nowhere.o1.captured").await;
    leave_row(&pool, "payments.o2.captured").await;

    let start = Instant::now();
    loop {
        let attempts = scalar(
            &pool,
            "SELECT coalesce(max(attempts), 0)::bigint FROM choreo.outbox",
        )
        .await;
        let left = scalar(&pool, "SELECT count(*) FROM choreo.outbox").await;
        if attempts >= 1 && left == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "attempts {attempts}, rows {left}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = js.get_stream("PAYMENTS").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        2,
        "the row behind the refused one was published"
    );
    let (subject, reason): (String, String) =
        sqlx::query_as("SELECT subject, last_error FROM choreo.outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(subject, "nowhere.o1.captured");
    assert!(reason.contains("nowhere.o1.captured"), "{reason}");

    // The report, as `choreo status` shows it.
    let start = Instant::now();
    let report = loop {
        let reports = registry::outboxes(&js).await.unwrap_or_default();
        if let Some(r) = reports
            .into_iter()
            .find(|r| r.failing == 1 && r.pending == 1)
        {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report.service, "payments");
    assert!(report.oldest_age_ms >= 60_000, "{report:?}");
    assert!(
        report
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("nowhere.o1.captured")),
        "{report:?}"
    );
    assert_eq!(report.relay_latest_ms(), 900);
    let svc = Service::new("payments")
        .state(_postgres.clone())
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    let status = admin::status(&js, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(status.outboxes.len(), 1, "{:?}", status.outboxes);
    assert_eq!(status.outboxes[0].failing, 1);

    // A retry waits longer each time, never more than 30 s.
    let retry_in: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM retry_at - now())::float8 FROM choreo.outbox",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(retry_in <= 30.0, "{retry_in}");

    // Lint: the rows failing is a warning.
    let manifests = vec![Service::new("payments").handler(charge).manifest()];
    let findings = admin::lint_outboxes(&js, &manifests).await;
    assert!(
        findings
            .iter()
            .any(|f| f.kind == FindingKind::OutboxFailing && f.severity == Severity::Warning),
        "{findings:?}"
    );
    svc.shutdown().await;
}

#[tokio::test]
async fn lint_flags_a_relay_later_than_a_streams_duplicate_window() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let publisher = Publisher::new(client.clone(), "payments")
        .unwrap()
        .stream_settings(StreamSettings::default().duplicate_window(Duration::from_secs(10)));
    publisher
        .publish(&PaymentCaptured {
            order_id: "first".into(),
        })
        .await
        .unwrap();
    // Accepted at start: 5 s + 2 × 1 s is inside 10 s.
    let _postgres = Postgres::start(pool.clone(), &publisher).await.unwrap();
    let manifests = vec![Service::new("payments").handler(charge).manifest()];
    let start = Instant::now();
    while registry::outboxes(&js).await.unwrap_or_default().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "no report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admin::lint_outboxes(&js, &manifests).await.is_empty());

    // Someone narrows the stream's window afterwards.
    let mut config = js
        .get_stream("PAYMENTS")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.duplicate_window = Duration::from_secs(3);
    js.update_stream(&config).await.unwrap();
    let findings = admin::lint_outboxes(&js, &manifests).await;
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].kind, FindingKind::RelayOutsideDuplicateWindow);
    assert_eq!(findings[0].severity, Severity::Error);
    assert!(
        findings[0]
            .message
            .contains("stream PAYMENTS's duplicate window of 3000 ms"),
        "{}",
        findings[0].message
    );
}

/// Entry points: an event staged in the caller's transaction is published
/// at the commit, at once; a rolled-back transaction publishes nothing; a
/// process that dies between the commit and the publish leaves the event
/// to the relay; the root event's correlation id is its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_events_publish_at_the_commit_and_a_rollback_publishes_nothing() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let storefront = Publisher::new(client.clone(), "storefront").unwrap();
    let postgres = Postgres::start_with(
        pool.clone(),
        &storefront,
        PostgresOptions::default()
            .relay_delay(Duration::from_secs(2))
            .relay_every(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    sqlx::query("CREATE TABLE orders (order_id text PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let outbox = postgres.outbox(&storefront);
    let recorder = choreo_testkit::Recorder::start(&client).await.unwrap();
    let place = |id: &'static str| {
        let (outbox, pool) = (outbox.clone(), pool.clone());
        // Spawned, as a web framework runs a request: the future is Send.
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO orders (order_id) VALUES ($1)")
                .bind(id)
                .execute(&mut *tx)
                .await
                .unwrap();
            let staged = outbox
                .stage(
                    &mut tx,
                    &OrderPlaced {
                        order_id: id.into(),
                        cents: 5,
                    },
                )
                .await
                .unwrap();
            (tx, staged)
        })
    };

    // Committed through the outbox: stored at once, long before the relay
    // would look, and its row gone.
    let (tx, staged) = place("o1").await.unwrap();
    let ids = staged.event_ids();
    let started = Instant::now();
    let committed = outbox.commit(tx, staged).await.unwrap();
    assert!(committed.published);
    assert_eq!(committed.event_ids, ids);
    let stored = recorder
        .expect::<OrderPlaced>()
        .within(Duration::from_secs(1))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(stored.meta.id(), ids[0]);
    assert_eq!(stored.meta.correlation_id(), ids[0], "a root event");
    assert_eq!(stored.meta.causation_id(), None);
    // Its row is deleted a moment after the publish (batched with other
    // deletes), well before the relay's 2 s delay would touch it.
    let published_at = Instant::now();
    while scalar(&pool, "SELECT count(*) FROM choreo.outbox").await > 0 {
        assert!(
            published_at.elapsed() < Duration::from_millis(1_500),
            "the published row was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Rolled back: no row, no event, ever.
    let (tx, staged) = place("o2").await.unwrap();
    drop(staged);
    tx.rollback().await.unwrap();

    // Committed, then the process "dies" before publishing: the relay
    // publishes it after its delay.
    let (tx, staged) = place("o3").await.unwrap();
    let o3 = staged.event_ids()[0];
    drop(staged);
    tx.commit().await.unwrap();
    let start = Instant::now();
    loop {
        let seen: Vec<_> = recorder
            .snapshot()
            .into_iter()
            .filter(|r| r.subject.starts_with("orders."))
            .map(|r| (r.subject, r.meta.id()))
            .collect();
        if seen.iter().any(|(_, id)| *id == o3) {
            assert!(
                start.elapsed() >= Duration::from_secs(1),
                "the relay waits its delay"
            );
            assert_eq!(seen.len(), 2, "o2 was rolled back: {seen:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "o3 never relayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scalar(&pool, "SELECT count(*) FROM orders").await, 2);
    let mut stream = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
}

/// Stages `n` of `key`'s events in order through `outbox`, one transaction
/// each, and records the staging order (the key's lock is held from the
/// stage to the commit, so the order the stages return in is the order).
async fn stage_key_events(
    outbox: choreo_postgres::Outbox,
    pool: PgPool,
    key: String,
    from: i64,
    n: i64,
    order: std::sync::Arc<std::sync::Mutex<Vec<(String, i64)>>>,
) {
    for i in from..from + n {
        let mut tx = pool.begin().await.unwrap();
        let staged = outbox
            .stage_in_order(
                &mut tx,
                &key,
                &OrderPlaced {
                    order_id: format!("{key}-{i}"),
                    cents: i,
                },
            )
            .await
            .unwrap();
        order.lock().unwrap().push((key.clone(), i));
        outbox.commit(tx, staged).await.unwrap();
    }
}

/// The stored `OrderPlaced` events of each key (`<key>-<i>` order ids), in
/// stream order.
async fn stored_by_key(js: &jetstream::Context) -> std::collections::HashMap<String, Vec<i64>> {
    let mut out: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let stream = js.get_stream("ORDERS").await.unwrap();
    for seq in 1..=stream.cached_info().state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let order = m.subject.split('.').nth(1).unwrap();
        let (key, i) = order.rsplit_once('-').unwrap();
        out.entry(key.to_owned())
            .or_default()
            .push(i.parse().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_events_are_stored_in_staging_order_while_the_relay_races() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let storefront = Publisher::new(client.clone(), "storefront").unwrap();
    // A relay that takes rows at once and looks every 10 ms: it races
    // every commit's own publish.
    let postgres = Postgres::start_with(
        pool.clone(),
        &storefront,
        PostgresOptions::default()
            .relay_delay(Duration::ZERO)
            .relay_every(Duration::from_millis(10)),
    )
    .await
    .unwrap();
    let outbox = postgres.outbox(&storefront);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = tokio::task::JoinSet::new();
    // Three keys, two writers each, 40 events per writer.
    for key in ["ka", "kb", "kc"] {
        for w in 0..2 {
            writers.spawn(stage_key_events(
                outbox.clone(),
                pool.clone(),
                key.to_owned(),
                w * 1000,
                40,
                order.clone(),
            ));
        }
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let start = Instant::now();
    while scalar(&pool, "SELECT count(*) FROM choreo.outbox").await > 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "rows left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = stored_by_key(&js).await;
    let order = order.lock().unwrap().clone();
    for key in ["ka", "kb", "kc"] {
        let staged: Vec<i64> = order
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(staged.len(), 80);
        assert_eq!(stored[key], staged, "{key} stored out of staging order");
    }
}

/// The relay is slow on purpose (its delay 1 s) and the key's first event
/// was committed by a process that died before publishing: the key's later
/// events wait for it, however fast their own commits publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_later_events_wait_for_an_earlier_one_the_relay_publishes() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let storefront = Publisher::new(client.clone(), "storefront").unwrap();
    let postgres = Postgres::start_with(
        pool.clone(),
        &storefront,
        PostgresOptions::default()
            .relay_delay(Duration::from_secs(1))
            .relay_every(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    let outbox = postgres.outbox(&storefront);
    let event = |i: i64| OrderPlaced {
        order_id: format!("k-{i}"),
        cents: i,
    };
    // The first: committed, never published by its process.
    let mut tx = pool.begin().await.unwrap();
    let staged = outbox
        .stage_in_order(&mut tx, "k", &event(1))
        .await
        .unwrap();
    drop(staged);
    tx.commit().await.unwrap();
    // The next ones through the outbox: none may overtake it.
    for i in 2..=5 {
        let mut tx = pool.begin().await.unwrap();
        let staged = outbox
            .stage_in_order(&mut tx, "k", &event(i))
            .await
            .unwrap();
        let committed = outbox.commit(tx, staged).await.unwrap();
        assert!(!committed.published, "k-{i} would overtake k-1");
    }
    // Another key is not held up.
    let mut tx = pool.begin().await.unwrap();
    let staged = outbox
        .stage_in_order(
            &mut tx,
            "other",
            &OrderPlaced {
                order_id: "other-1".into(),
                cents: 1,
            },
        )
        .await
        .unwrap();
    assert!(outbox.commit(tx, staged).await.unwrap().published);
    let start = Instant::now();
    while scalar(&pool, "SELECT count(*) FROM choreo.outbox").await > 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "rows left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "the relay waited its delay"
    );
    assert_eq!(stored_by_key(&js).await["k"], vec![1, 2, 3, 4, 5]);
}

/// Several events of one transaction are one atomic batch where the stream
/// takes them (nats-server 2.12+, `allow_atomic`), and one by one where it
/// does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_events_are_one_atomic_batch_where_the_stream_takes_them() {
    let (_nats, _pg, client, js, pool) = servers().await;
    let storefront = Publisher::new(client.clone(), "storefront").unwrap();
    storefront.ensure_stream::<OrderPlaced>().await.unwrap();
    let postgres = Postgres::start(pool.clone(), &storefront).await.unwrap();
    let outbox = postgres.outbox(&storefront);
    let atomic = |on: bool| {
        let js = js.clone();
        async move {
            let mut config = js
                .get_stream("ORDERS")
                .await
                .unwrap()
                .cached_info()
                .config
                .clone();
            config.allow_atomic_publish = on;
            js.update_stream(&config).await.unwrap();
        }
    };
    let three = |run: &'static str| {
        let (outbox, pool) = (outbox.clone(), pool.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let mut staged = choreo_postgres::Staged::default();
            for i in 0..3 {
                let one = outbox
                    .stage(
                        &mut tx,
                        &OrderPlaced {
                            order_id: format!("{run}{i}"),
                            cents: i,
                        },
                    )
                    .await
                    .unwrap();
                staged = staged.and(one);
            }
            assert!(outbox.commit(tx, staged).await.unwrap().published);
        }
    };
    let batch_ids = |run: &'static str| {
        let js = js.clone();
        async move {
            let stream = js.get_stream("ORDERS").await.unwrap();
            let mut ids = Vec::new();
            for seq in 1..=stream.cached_info().state.last_sequence {
                let m = stream.get_raw_message(seq).await.unwrap();
                if m.subject.starts_with(&format!("orders.{run}")) {
                    ids.push(
                        m.headers
                            .get("Nats-Batch-Id")
                            .map(|v| v.as_str().to_owned()),
                    );
                }
            }
            ids
        }
    };
    atomic(true).await;
    three("a").await;
    let ids = batch_ids("a").await;
    assert_eq!(ids.len(), 3);
    assert!(ids[0].is_some(), "stored as a batch: {ids:?}");
    assert!(ids.iter().all(|id| *id == ids[0]), "one batch: {ids:?}");
    atomic(false).await;
    three("b").await;
    assert_eq!(batch_ids("b").await, vec![None, None, None], "one by one");
}
