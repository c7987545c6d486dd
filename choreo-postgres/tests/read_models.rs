//! Read models against a real Postgres and a real nats-server: a
//! projection keeps its table exactly once, a request reads its own write
//! with `wait_applied`, and `choreo replay --rerun` (here its library call)
//! rebuilds the model with new DDL into a fresh generation while the old
//! one serves reads, then swaps it in.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use choreo::admin::{self, Point};
use choreo::{HandlerError, Publisher, Service, State, event_handler};
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Pg, PgError, Postgres, PostgresOptions, ReadModel};
use choreo_testkit::{NatsServer, PostgresServer};
use common::OrderPlaced;

/// The order view as it was first deployed.
static ORDERS: ReadModel = ReadModel::new(
    "orders",
    "CREATE TABLE order_view (order_id text PRIMARY KEY, cents bigint NOT NULL, runs int NOT NULL)",
);

/// The same model, deployed again with a column more: rebuilt by a rerun.
static ORDERS_V2: ReadModel = ReadModel::new(
    "orders",
    "CREATE TABLE order_view (order_id text PRIMARY KEY, cents bigint NOT NULL, runs int NOT NULL,
                              euros numeric NOT NULL)",
);

/// Closed: the projection refuses (and is retried), so a rebuild can be
/// watched while it has not caught up.
#[derive(Clone, Default)]
struct Gate(Arc<AtomicBool>);

/// `runs` counts how often an event was applied to the generation.
#[event_handler(idempotent = false, backoff = ["100ms"])]
async fn project(order: OrderPlaced, pg: Pg) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin_read_model(&ORDERS).await? else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO order_view (order_id, cents, runs) VALUES ($1, $2, 1)
         ON CONFLICT (order_id) DO UPDATE SET runs = order_view.runs + 1",
    )
    .bind(&order.order_id)
    .bind(order.cents)
    .execute(tx.conn())
    .await
    .map_err(HandlerError::retryable)?;
    tx.commit().await
}

// Retried for as long as the test keeps the gate closed.
#[event_handler(name = "project", idempotent = false, max_deliver = 1000, backoff = ["100ms"])]
async fn project_v2(
    order: OrderPlaced,
    pg: Pg,
    State(gate): State<Gate>,
) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin_read_model(&ORDERS_V2).await? else {
        return Ok(());
    };
    if !gate.0.load(Ordering::SeqCst) {
        return Err(HandlerError::retryable("the gate is closed"));
    }
    sqlx::query(
        "INSERT INTO order_view (order_id, cents, runs, euros) VALUES ($1, $2, 1, $2 / 100.0)
         ON CONFLICT (order_id) DO UPDATE SET runs = order_view.runs + 1",
    )
    .bind(&order.order_id)
    .bind(order.cents)
    .execute(tx.conn())
    .await
    .map_err(HandlerError::retryable)?;
    tx.commit().await
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn order(i: i64) -> OrderPlaced {
    OrderPlaced {
        order_id: format!("o{i}"),
        cents: 100 * i,
    }
}

async fn store(client: &choreo::async_nats::Client, pool: &PgPool) -> Postgres {
    let publisher = Publisher::new(client.clone(), "views").unwrap();
    Postgres::start_with(
        pool.clone(),
        &publisher,
        PostgresOptions::default()
            .relay_delay(Duration::from_secs(1))
            .relay_every(Duration::from_millis(200)),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_is_kept_once_read_after_writes_and_rebuilt_while_the_old_serves_reads() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let js = choreo::async_nats::jetstream::new(client.clone());
    let pool = common::pool(&pg.url()).await;
    let postgres = store(&client, &pool).await;
    let v1 = Service::new("views")
        .state(postgres.clone())
        .handler(project)
        .start(client.clone())
        .await
        .unwrap();
    let shop = Publisher::new(client.clone(), "shop").unwrap();

    // Read your own writes: once `wait_applied` returns, the view has it.
    for i in 0..20 {
        let receipt = shop.publish(&order(i)).await.unwrap();
        postgres
            .wait_applied(&ORDERS, receipt.event_id, Duration::from_secs(10))
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM order_view WHERE order_id = $1")
            .bind(format!("o{i}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(seen, 1, "o{i} is in the view once wait_applied returned");
    }
    assert_eq!(
        scalar(&pool, "SELECT max(runs)::bigint FROM order_view").await,
        1
    );
    v1.shutdown().await;

    // Version 2 of the service changes the view's columns; a rerun replay
    // from the stream's start rebuilds the model.
    let gate = Gate::default();
    let v2 = Service::new("views")
        .state(postgres.clone())
        .state(gate.clone())
        .handler(project_v2)
        .start(client.clone())
        .await
        .unwrap();
    let plan = admin::plan(&js, "views", "project", Point::Sequence(1), None, true)
        .await
        .unwrap();
    assert_eq!(plan.events, 20);
    admin::replay(&js, &plan, false).await.unwrap();

    // The rebuild is under way and cannot finish while the gate is closed:
    // the old generation serves reads, whole and unchanged.
    let start = Instant::now();
    while scalar(
        &pool,
        "SELECT count(*) FROM choreo.read_models WHERE building = 2",
    )
    .await
        == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no rebuild began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = shop.publish(&order(20)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM order_view").await, 20);
    assert_eq!(
        scalar(&pool, "SELECT max(runs)::bigint FROM order_view").await,
        1
    );
    let not_yet = postgres
        .wait_applied(&ORDERS_V2, late.event_id, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(not_yet, PgError::NotApplied(_)),
        "an event only the rebuild has seen is not applied to what readers see: {not_yet}"
    );

    // Open the gate: the fresh generation catches up and is swapped in.
    gate.0.store(true, Ordering::SeqCst);
    postgres
        .wait_applied(&ORDERS_V2, late.event_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM order_view WHERE euros = cents / 100.0"
        )
        .await,
        21,
        "every event, old and new, is in the new view's new column"
    );
    assert_eq!(
        scalar(&pool, "SELECT max(runs)::bigint FROM order_view").await,
        1
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'choreo_rm_orders_1'"
        )
        .await,
        0,
        "the old generation is dropped"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT live::bigint FROM choreo.read_models WHERE name = 'orders'"
        )
        .await,
        2
    );

    // And it keeps up afterwards.
    let after = shop.publish(&order(21)).await.unwrap();
    postgres
        .wait_applied(&ORDERS_V2, after.event_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(scalar(&pool, "SELECT count(*) FROM order_view").await, 22);
    v2.shutdown().await;
}

#[tokio::test]
async fn a_read_model_with_a_bad_name_is_refused_with_the_reason() {
    static BAD: ReadModel = ReadModel::new("Orders-View", "CREATE TABLE x (a int)");
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let pool = common::pool(&pg.url()).await;
    let postgres = store(&client, &pool).await;
    // The name is checked before the database is asked.
    let err = postgres
        .wait_applied(
            &BAD,
            choreo::EventId::new_random(),
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("\"Orders-View\"") && text.contains("lower-case letters"),
        "{text}"
    );
}
