//! Postgres handlers in processes killed with SIGKILL under load: whatever
//! the moment (in a transaction, between a commit and its publish, between
//! a publish and its ack, in the relay), no effect happens twice, no
//! emission is lost, and no event is left unhandled. And each of those
//! moments on purpose, one process at a time: a process that dies right
//! after its commit, one that dies after its publish and before its ack,
//! and one killed while its relay has published rows and not yet deleted
//! them.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use choreo::async_nats::jetstream;
use choreo::{Context, HandlerError, Publisher, Service, State, event_handler};
use choreo_postgres::sqlx;
use choreo_postgres::{Pg, Postgres, PostgresOptions};
use choreo_testkit::{NatsServer, PostgresServer};
use common::{OrderPlaced, PaymentCaptured, pool};

const CHILD_NATS: &str = "CHOREO_PG_CRASH_NATS";
const CHILD_PG: &str = "CHOREO_PG_CRASH_PG";
/// `commit` or `publish`: where the process dies, for the order
/// `CHOREO_PG_CRASH_ORDER` names.
const CHILD_CRASH_AT: &str = "CHOREO_PG_CRASH_AT";
const CHILD_CRASH_ORDER: &str = "CHOREO_PG_CRASH_ORDER";

/// Where this process dies on purpose, if anywhere.
#[derive(Clone, Default)]
struct CrashAt(Option<(String, String)>);
const ORDERS: u64 = 1500;

#[event_handler(idempotent = false, emits = PaymentCaptured, ack_wait = "2s")]
async fn charge(
    order: OrderPlaced,
    ctx: Context,
    pg: Pg,
    State(crash): State<CrashAt>,
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
    let dies = |at: &str| {
        crash
            .0
            .as_ref()
            .is_some_and(|(point, o)| point == at && *o == order.order_id)
    };
    if dies("publish") {
        // Runs once the emission is stored, before the ack (and before the
        // outbox row's delete, registered later by the commit).
        ctx.after_emit(|| Box::pin(async { std::process::abort() }));
    }
    let dies_after_commit = dies("commit");
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
    tx.commit().await?;
    if dies_after_commit {
        std::process::abort();
    }
    Ok(())
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
        let crash = match (
            std::env::var(CHILD_CRASH_AT),
            std::env::var(CHILD_CRASH_ORDER),
        ) {
            (Ok(at), Ok(order)) => CrashAt(Some((at, order))),
            _ => CrashAt(None),
        };
        let handle = Service::new("payments")
            .state(store)
            .state(crash)
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
    spawn_dying(nats, pg, None)
}

/// A payments process that dies at `crash` (`commit` or `publish`, and
/// the order).
fn spawn_dying(nats: &str, pg: &str, crash: Option<(&str, &str)>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "payments_process", "--ignored", "--nocapture"])
        .env(CHILD_NATS, nats)
        .env(CHILD_PG, pg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some((at, order)) = crash {
        cmd.env(CHILD_CRASH_AT, at).env(CHILD_CRASH_ORDER, order);
    }
    cmd.spawn().unwrap()
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
        let charges = scalar(&db, "SELECT count(*) FROM charges").await;
        let outbox = scalar(&db, "SELECT count(*) FROM choreo.outbox").await;
        let captured = js
            .get_stream("PAYMENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        let info = charge_consumer(&js).await;
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

/// The charge handler's durable, as the server reads it now.
async fn charge_consumer(js: &jetstream::Context) -> jetstream::consumer::Info {
    js.get_stream("ORDERS")
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("payments--charge")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone()
}

/// How many times the PAYMENTS stream holds each subject.
async fn stored(js: &jetstream::Context) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(mut stream) = js.get_stream("PAYMENTS").await else {
        return out;
    };
    let state = stream.info().await.unwrap().state.clone();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            *out.entry(m.subject.to_string()).or_insert(0) += 1;
        }
    }
    out
}

async fn scalar(db: &choreo_postgres::sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

/// Waits until `f` holds, or fails saying `what`.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a process to end (it aborts itself), killing it after 60 s.
async fn ended(mut child: Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            kill(&mut child);
            panic!("the process did not die where it was told to");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_crash_point_leaves_nothing_twice_and_nothing_lost() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let js = jetstream::new(client.clone());
    let db = pool(&pg.url()).await;
    let shop = Publisher::new(client.clone(), "shop").unwrap();
    shop.ensure_stream::<OrderPlaced>().await.unwrap();
    shop.ensure_stream::<PaymentCaptured>().await.unwrap();
    let (n, p) = (nats.url(), pg.url());
    let order = |id: &str| OrderPlaced {
        order_id: id.into(),
        cents: 1,
    };
    let captured = |id: &'static str| {
        let js = js.clone();
        async move {
            stored(&js)
                .await
                .get(&format!("payments.{id}.captured"))
                .copied()
                .unwrap_or(0)
        }
    };

    // 1. Dies right after its commit: the charge and the outbox row are
    // committed, nothing is published or acknowledged.
    let mut dying = spawn_dying(&n, &p, Some(("commit", "c1")));
    ready(&mut dying).await;
    shop.publish(&order("c1")).await.unwrap();
    assert!(!ended(dying).await.success());
    assert_eq!(
        captured("c1").await,
        0,
        "nothing published before the crash"
    );
    assert_eq!(scalar(&db, "SELECT count(*) FROM choreo.outbox").await, 1);

    // 2. Another process: the copy finds its inbox row, the relay
    // publishes the emission once.
    let mut survivor = spawn(&n, &p);
    ready(&mut survivor).await;
    until("c1 captured by the relay", || async {
        captured("c1").await == 1 && scalar(&db, "SELECT count(*) FROM choreo.outbox").await == 0
    })
    .await;
    kill(&mut survivor);

    // 3. Dies after its publish and before its ack (and its row's
    // delete): the copy is skipped, the relay's second publish is a
    // duplicate the stream drops.
    let mut dying = spawn_dying(&n, &p, Some(("publish", "p1")));
    ready(&mut dying).await;
    shop.publish(&order("p1")).await.unwrap();
    assert!(!ended(dying).await.success());
    assert_eq!(captured("p1").await, 1, "published before the crash");
    assert_eq!(scalar(&db, "SELECT count(*) FROM choreo.outbox").await, 1);
    let mut survivor = spawn(&n, &p);
    ready(&mut survivor).await;
    until("p1's row relayed", || async {
        scalar(&db, "SELECT count(*) FROM choreo.outbox").await == 0
    })
    .await;
    kill(&mut survivor);

    // 4. Killed in its relay: a row left (as in 1), and the relay stalled
    // after its publish, before its delete commits (the test holds the
    // outbox in SHARE mode, which lets the relay lock and read its rows
    // and blocks its delete). Killed there, its transaction rolls back;
    // the next relay publishes the row again, and the stream drops it.
    let mut dying = spawn_dying(&n, &p, Some(("commit", "r1")));
    ready(&mut dying).await;
    shop.publish(&order("r1")).await.unwrap();
    assert!(!ended(dying).await.success());
    let mut hold = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE choreo.outbox IN SHARE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let mut relaying = spawn(&n, &p);
    ready(&mut relaying).await;
    until("r1 published by the stalled relay", || async {
        captured("r1").await == 1
    })
    .await;
    kill(&mut relaying);
    hold.rollback().await.unwrap();
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM choreo.outbox").await,
        1,
        "the killed relay's delete never committed"
    );
    let mut survivor = spawn(&n, &p);
    ready(&mut survivor).await;
    until("r1's row relayed again", || async {
        scalar(&db, "SELECT count(*) FROM choreo.outbox").await == 0
    })
    .await;

    // Each order charged once, captured once; nothing left to handle.
    let counts = stored(&js).await;
    for id in ["c1", "p1", "r1"] {
        assert_eq!(
            counts.get(&format!("payments.{id}.captured")),
            Some(&1),
            "{id}: {counts:?}"
        );
    }
    assert_eq!(scalar(&db, "SELECT count(*) FROM charges").await, 3);
    assert_eq!(
        scalar(&db, "SELECT count(DISTINCT order_id) FROM charges").await,
        3
    );
    until("every order acknowledged", || async {
        let info = charge_consumer(&js).await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    kill(&mut survivor);
}
