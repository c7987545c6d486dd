//! Postgres handlers against a real Postgres and a real nats-server: each
//! event's effects applied once, its emissions published once even when the
//! process dies between its commit and its publish, copies of an event
//! running at once on two instances committed by one, and a schema that
//! migrates once, with indexes on every hot-path query.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use choreo::async_nats::jetstream;
use choreo::{Context, HandlerError, Publisher, Service, State, event_handler};
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Pg, Postgres, PostgresOptions};
use choreo_testkit::{NatsServer, PostgresServer, Recorder};
use common::{OrderPlaced, PaymentCaptured};

/// Orders whose first run dies after its commit and before its publish.
#[derive(Clone, Default)]
struct Dies(Arc<Mutex<HashSet<String>>>);

/// How long a run holds its transaction open (to make copies overlap).
#[derive(Clone, Default)]
struct Slow(Duration);

#[event_handler(idempotent = false, emits = PaymentCaptured, backoff = ["100ms"])]
async fn charge(
    order: OrderPlaced,
    ctx: Context,
    pg: Pg,
    State(dies): State<Dies>,
    State(slow): State<Slow>,
) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    sqlx::query("INSERT INTO charges (order_id, cents) VALUES ($1, $2)")
        .bind(&order.order_id)
        .bind(order.cents)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    tokio::time::sleep(slow.0).await;
    ctx.emit(PaymentCaptured {
        order_id: order.order_id.clone(),
    });
    tx.commit().await?;
    if dies.0.lock().unwrap().remove(&order.order_id) {
        // As a process killed here: committed, nothing published or acked.
        return Err(HandlerError::retryable(
            "dies after its commit, before its publish",
        ));
    }
    Ok(())
}

async fn pool(pg: &PostgresServer) -> PgPool {
    common::pool(&pg.url()).await
}

fn options() -> PostgresOptions {
    PostgresOptions::default()
        .relay_delay(Duration::from_secs(1))
        .relay_every(Duration::from_millis(200))
}

async fn payments(
    client: &choreo::async_nats::Client,
    pool: PgPool,
    dies: Dies,
    slow: Slow,
) -> choreo::ServiceHandle {
    let publisher = Publisher::new(client.clone(), "payments").unwrap();
    let store = Postgres::start_with(pool, &publisher, options())
        .await
        .unwrap();
    Service::new("payments")
        .state(store)
        .state(dies)
        .state(slow)
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_applied_once_and_its_emissions_published_once_even_across_a_crash() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let pool = pool(&pg).await;
    let recorder = Recorder::start(&client).await.unwrap();
    let dies = Dies::default();
    for i in (0..40).step_by(4) {
        dies.0.lock().unwrap().insert(format!("o{i}"));
    }
    let svc = payments(&client, pool.clone(), dies.clone(), Slow::default()).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    let orders: Vec<OrderPlaced> = (0..40)
        .map(|i| OrderPlaced {
            order_id: format!("o{i}"),
            cents: 100 + i,
        })
        .collect();
    shop.publish_all(&orders).await.unwrap();

    let captured = || {
        recorder
            .snapshot()
            .into_iter()
            .filter(|r| r.subject.starts_with("payments."))
            .collect::<Vec<_>>()
    };
    eventually("40 payments captured", Duration::from_secs(30), || async {
        captured().len() >= 40
    })
    .await;
    eventually("the outbox emptied", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM choreo.outbox").await == 0
    })
    .await;
    recorder
        .settled(&client, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(dies.0.lock().unwrap().is_empty(), "every crash happened");
    // One effect per order, one emission per order.
    assert_eq!(count(&pool, "SELECT count(*) FROM charges").await, 40);
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT order_id) FROM charges").await,
        40
    );
    let subjects: HashSet<String> = captured().into_iter().map(|r| r.subject).collect();
    assert_eq!(captured().len(), 40, "no emission stored twice");
    assert_eq!(subjects.len(), 40);
    assert_eq!(count(&pool, "SELECT count(*) FROM choreo.inbox").await, 40);
    svc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_running_at_once_on_two_instances_are_committed_by_one() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let pool = pool(&pg).await;
    let slow = Slow(Duration::from_millis(300));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let own = nats.connect().await.unwrap();
        instances.push(payments(&own, pool.clone(), Dies::default(), slow.clone()).await);
    }
    // One event, stored 10 times under different message ids (copies a
    // replay or a publisher past the duplicate window makes): the same
    // event id each time.
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    let receipt = shop
        .publish(&OrderPlaced {
            order_id: "o1".into(),
            cents: 500,
        })
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stored = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_raw_message(receipt.sequence)
        .await
        .unwrap();
    for copy in 0..9 {
        let mut headers = stored.headers.clone();
        headers.insert("Nats-Msg-Id", format!("copy-{copy}"));
        js.publish_with_headers(stored.subject.to_string(), headers, stored.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer = async || {
        let s = js.get_stream("ORDERS").await.unwrap();
        let mut c: jetstream::consumer::PullConsumer =
            s.get_consumer("payments--charge").await.unwrap();
        let info = c.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    };
    eventually("every copy handled", Duration::from_secs(30), consumer).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM charges WHERE order_id = 'o1'").await,
        1,
        "ten copies, two instances, one commit"
    );
    for i in instances {
        i.shutdown().await;
    }
}

#[tokio::test]
async fn the_schema_migrates_once_and_the_hot_path_uses_indexes() {
    let pg = PostgresServer::start().await.unwrap();
    let pool = pool(&pg).await;
    // Instances starting together take turns.
    let (a, b) = tokio::join!(
        choreo_postgres::migrate(&pool),
        choreo_postgres::migrate(&pool)
    );
    assert_eq!((a.unwrap(), b.unwrap()), (2, 2));
    assert_eq!(
        pg.psql(
            "SELECT string_agg(version::text, ' ' ORDER BY version) FROM choreo.schema_version"
        )
        .unwrap(),
        "1 2",
        "each migration applied once"
    );
    // Full enough tables that the planner's choice means something.
    pg.psql(
        "INSERT INTO choreo.inbox (handler, event_id, handled_at)
           SELECT 'payments.charge', gen_random_uuid(), now() - (n || ' seconds')::interval
           FROM generate_series(1, 50000) n;
         INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload, created_at)
           SELECT gen_random_uuid(), 'PaymentCaptured', 'payments.o.captured', '[]', '\\x00',
                  now() - (n || ' milliseconds')::interval
           FROM generate_series(1, 50000) n;
         INSERT INTO choreo.read_models (name, views, live) VALUES ('orders', 'public', 1);
         INSERT INTO choreo.read_model_handlers (name, service, handler)
           VALUES ('orders', 'payments', 'charge');
         ANALYZE choreo.inbox; ANALYZE choreo.outbox;",
    )
    .unwrap();
    // What a row costs, indexes included.
    let per_row: i64 = pg
        .psql("SELECT pg_total_relation_size('choreo.inbox') / count(*) FROM choreo.inbox")
        .unwrap()
        .parse()
        .unwrap();
    println!("an inbox row with its index entries: {per_row} bytes");
    assert!(per_row < 250, "{per_row} bytes per inbox row");
    for (what, sql) in [
        (
            "the inbox claim",
            "EXPLAIN INSERT INTO choreo.inbox (handler, event_id) VALUES ('payments.charge', gen_random_uuid()) ON CONFLICT DO NOTHING",
        ),
        (
            "the relay's read",
            "EXPLAIN SELECT seq FROM choreo.outbox o WHERE created_at < now() - make_interval(secs => 5) AND (retry_at IS NULL OR retry_at <= now()) AND (okey IS NULL OR NOT EXISTS (SELECT 1 FROM choreo.outbox p WHERE p.okey = o.okey AND p.seq < o.seq)) ORDER BY seq LIMIT 256 FOR UPDATE SKIP LOCKED",
        ),
        (
            "a key's older events waiting (Outbox::commit, in key order)",
            "EXPLAIN SELECT EXISTS (SELECT 1 FROM choreo.outbox WHERE okey = 'k' AND seq < 40000)",
        ),
        (
            "the outbox delete",
            "EXPLAIN DELETE FROM choreo.outbox WHERE seq = 12345",
        ),
        (
            "the inbox prune",
            "EXPLAIN DELETE FROM choreo.inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM choreo.inbox WHERE handled_at < now() - make_interval(secs => 40000) LIMIT 1000))",
        ),
        (
            // `Postgres::applied`: read_models has a row per model, which
            // the planner rightly scans; the inbox must not be.
            "the read-your-writes lookup",
            "EXPLAIN SELECT EXISTS (SELECT 1 FROM choreo.read_models r JOIN choreo.read_model_handlers h ON h.name = r.name JOIN choreo.inbox i ON i.handler = CASE WHEN r.live = 1 THEN h.service || '.' || h.handler ELSE h.service || '.' || h.handler || '#' || r.live END AND i.event_id = '0191e0c2-0000-7000-8000-000000000000'::uuid WHERE r.name = 'orders')",
        ),
    ] {
        let plan = pg.psql(sql).unwrap();
        println!("{what}:\n{plan}\n");
        assert!(
            !plan.contains("Seq Scan on inbox") && !plan.contains("Seq Scan on outbox"),
            "{what} scans its table:\n{plan}"
        );
    }
}

#[tokio::test]
async fn a_relay_later_than_the_duplicate_window_is_refused() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let publisher = Publisher::new(client, "payments").unwrap().stream_settings(
        choreo::StreamSettings::default().duplicate_window(Duration::from_secs(5)),
    );
    let err = Postgres::start_with(
        pool(&pg).await,
        &publisher,
        PostgresOptions::default().relay_delay(Duration::from_secs(5)),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("duplicate window of 5s"), "{text}");
    assert!(text.contains("shorten the relay delay"), "{text}");
}

/// Round after round of events, the inbox holds about one retention's
/// worth of rows and the outbox none: the tables do not grow with time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tables_stay_flat_over_many_horizons() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let pool = pool(&pg).await;
    let publisher = Publisher::new(client.clone(), "payments").unwrap();
    let retention = Duration::from_secs(1);
    let store = Postgres::start_with(
        pool.clone(),
        &publisher,
        options().inbox_retention(retention),
    )
    .await
    .unwrap();
    let svc = Service::new("payments")
        .state(store)
        .state(Dies::default())
        .state(Slow::default())
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    let mut sizes = Vec::new();
    for round in 0..6 {
        let orders: Vec<OrderPlaced> = (0..30)
            .map(|i| OrderPlaced {
                order_id: format!("r{round}-{i}"),
                cents: 1,
            })
            .collect();
        shop.publish_all(&orders).await.unwrap();
        let want = 30 * (round + 1);
        eventually("the round's charges", Duration::from_secs(20), || async {
            count(&pool, "SELECT count(*) FROM charges").await == want
        })
        .await;
        let fresh = count(&pool, "SELECT count(*) FROM choreo.inbox").await;
        // A retention and a bit later.
        tokio::time::sleep(retention + Duration::from_millis(300)).await;
        let later = count(&pool, "SELECT count(*) FROM choreo.inbox").await;
        let outbox = count(&pool, "SELECT count(*) FROM choreo.outbox").await;
        sizes.push((fresh, later, outbox));
    }
    println!("inbox rows after each round and a retention later, outbox rows: {sizes:?}");
    for (fresh, later, outbox) in &sizes {
        assert!(
            (30..=60).contains(fresh),
            "the inbox holds this round's rows and at most the last's: {sizes:?}"
        );
        assert_eq!(*later, 0, "pruned once past the retention: {sizes:?}");
        assert_eq!(*outbox, 0);
    }
    svc.shutdown().await;
}
