//! Postgres handlers in processes killed with SIGKILL under load: whatever
//! the moment (in a transaction, between a commit and its publish, between
//! a publish and its ack, in the relay), no effect happens twice, no
//! emission is lost, and no event is left unhandled.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use choreo::async_nats::jetstream;
use choreo::{Context, HandlerError, Publisher, Service, event_handler};
use choreo_postgres::sqlx;
use choreo_postgres::{Pg, Postgres, PostgresOptions};
use choreo_testkit::{NatsServer, PostgresServer};
use common::{OrderPlaced, PaymentCaptured, pool};

const CHILD_NATS: &str = "CHOREO_PG_CRASH_NATS";
const CHILD_PG: &str = "CHOREO_PG_CRASH_PG";
const ORDERS: u64 = 1500;

#[event_handler(idempotent = false, emits = PaymentCaptured, ack_wait = "2s")]
async fn charge(order: OrderPlaced, ctx: Context, pg: Pg) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    sqlx::query("INSERT INTO charges (order_id, cents) VALUES ($1, $2)")
        .bind(&order.order_id)
        .bind(order.cents)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
    tx.commit().await
}

/// The payments service in its own process (this test binary, re-run).
#[test]
#[ignore = "a payments process of the crash test; run by it"]
fn payments_process() {
    let (Ok(nats), Ok(pg)) = (std::env::var(CHILD_NATS), std::env::var(CHILD_PG)) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = choreo::async_nats::connect(nats).await.unwrap();
        let publisher = Publisher::new(client.clone(), "payments").unwrap();
        let options = PostgresOptions::default()
            .relay_delay(Duration::from_secs(1))
            .relay_every(Duration::from_millis(200));
        let store = Postgres::start_with(pool(&pg).await, &publisher, options)
            .await
            .unwrap();
        let handle = Service::new("payments")
            .state(store)
            .handler(charge)
            .start(client)
            .await
            .unwrap();
        println!("payments ready");
        std::future::pending::<()>().await;
        drop(handle);
    });
}

fn spawn(nats: &str, pg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "payments_process", "--ignored", "--nocapture"])
        .env(CHILD_NATS, nats)
        .env(CHILD_PG, pg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the process says it is ready; reads its output to the end.
async fn ready(child: &mut Child) {
    let out = child.stdout.take().unwrap();
    let (said, ready) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut said = Some(said);
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if l == "payments ready"
                && let Some(said) = said.take()
            {
                let _ = said.send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .expect("the payments process was not ready in 60 s")
        .expect("the payments process ended before it was ready");
}

fn kill(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_processes_killed_under_load_do_nothing_twice_and_lose_nothing() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let db = pool(&pg.url()).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    shop.ensure_stream::<OrderPlaced>().await.unwrap();
    shop.ensure_stream::<PaymentCaptured>().await.unwrap();

    // Two payments processes; every 1.2 s one of them is killed with
    // SIGKILL and a new one started, while orders come at about 500/s.
    let mut procs = vec![spawn(&nats.url(), &pg.url()), spawn(&nats.url(), &pg.url())];
    for p in &mut procs {
        ready(p).await;
    }
    let placing = tokio::spawn({
        let shop = shop.clone();
        async move {
            for batch in 0..ORDERS / 50 {
                let orders: Vec<OrderPlaced> = (batch * 50..batch * 50 + 50)
                    .map(|i| OrderPlaced {
                        order_id: format!("o{i}"),
                        cents: i as i64,
                    })
                    .collect();
                shop.publish_all(&orders).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let mut kills = 0;
    while !placing.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let victim = kills % 2;
        kill(&mut procs[victim]);
        kills += 1;
        procs[victim] = spawn(&nats.url(), &pg.url());
        ready(&mut procs[victim]).await;
    }
    placing.await.unwrap();

    // Everything handled, every emission stored, the outbox empty.
    let js = jetstream::new(client.clone());
    let started = Instant::now();
    loop {
        let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
            .fetch_one(&db)
            .await
            .unwrap();
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM choreo.outbox")
            .fetch_one(&db)
            .await
            .unwrap();
        let captured = js
            .get_stream("PAYMENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        let info = js
            .get_stream("ORDERS")
            .await
            .unwrap()
            .get_consumer::<jetstream::consumer::pull::Config>("payments--charge")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        if charges as u64 >= ORDERS
            && captured >= ORDERS
            && outbox == 0
            && info.num_pending == 0
            && info.num_ack_pending == 0
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "charges {charges}, captured {captured}, outbox {outbox}, pending {}, unacked {}",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(&db)
        .await
        .unwrap();
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT order_id) FROM charges")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        (charges, distinct),
        (ORDERS as i64, ORDERS as i64),
        "an effect twice"
    );
    let mut seen = HashSet::new();
    let stream = js.get_stream("PAYMENTS").await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        assert!(
            seen.insert(m.subject.to_string()),
            "{} stored twice",
            m.subject
        );
    }
    assert_eq!(seen.len() as u64, ORDERS, "an emission lost");
    println!("{kills} processes killed; {ORDERS} orders charged and captured once each");
    for mut p in procs {
        kill(&mut p);
    }
}
