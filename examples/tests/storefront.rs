//! The storefront, over real HTTP, against a real Postgres and nats-server:
//! an order placed once however often it is posted, shown by the read
//! model as soon as its request returned; and a storefront process killed
//! with SIGKILL under load: every order answered 201 has exactly one row
//! and one `OrderPlaced`, no event exists without its row, and an order
//! whose request failed has both or neither.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use choreo::StreamSettings;
use choreo::async_nats::jetstream;
use choreo_examples::http::HttpClient;
use choreo_examples::shop::{self, Ledger, Line};
use choreo_examples::storefront::{NewOrder, OrderView, Placed};
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_postgres::sqlx::{self, PgPool};
use choreo_testkit::{NatsServer, PostgresServer};

async fn pool(pg: &PostgresServer) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg.url())
        .await
        .unwrap()
}

fn new_order(id: &str) -> Vec<u8> {
    serde_json::to_vec(&NewOrder {
        order_id: id.into(),
        customer: "alice".into(),
        lines: vec![Line {
            sku: "teapot".into(),
            quantity: 2,
        }],
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_placed_once_and_read_back_at_once() {
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let ledger = Ledger::open(&client, pool(&pg).await).await.unwrap();
    // The orders service keeps the read model.
    let orders = shop::service("orders", ledger.clone(), StreamSettings::default())
        .await
        .unwrap()
        .start(client.clone())
        .await
        .unwrap();
    let storefront = shop::storefront(&ledger, StreamSettings::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, serving) = shop::serve_storefront(storefront, listener).unwrap();
    let mut http = HttpClient::new(addr);

    let first = http.post_json("/orders", &new_order("w-1")).await.unwrap();
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let placed: Placed = serde_json::from_slice(&first.body).unwrap();
    // Read your own write: the view has it as soon as the request returns.
    let shown = http.get("/orders/w-1").await.unwrap();
    assert_eq!(
        shown.status,
        200,
        "{}",
        String::from_utf8_lossy(&shown.body)
    );
    let view: OrderView = serde_json::from_slice(&shown.body).unwrap();
    assert_eq!(view.order_id, "w-1");
    assert_eq!(view.customer.as_deref(), Some("alice"));
    assert_eq!(view.total_cents, Some(2 * 1999));

    // Posted again (a client's retry): the same order, nothing new.
    let again = http.post_json("/orders", &new_order("w-1")).await.unwrap();
    assert_eq!(again.status, 200);
    let again: Placed = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(again.event_id, placed.event_id);
    let js = jetstream::new(client.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stream = js.get_stream("ORDERS").await.unwrap();
    let mut copies = 0;
    for seq in 1..=stream.cached_info().state.last_sequence {
        if stream.get_raw_message(seq).await.unwrap().subject.as_str() == "orders.w-1.placed" {
            copies += 1;
        }
    }
    assert_eq!(copies, 1, "one OrderPlaced for the order posted twice");

    // Unknown orders and bad requests.
    assert_eq!(http.get("/orders/none").await.unwrap().status, 404);
    let empty = serde_json::to_vec(&NewOrder {
        order_id: "w-2".into(),
        customer: "bob".into(),
        lines: vec![],
    })
    .unwrap();
    assert_eq!(http.post_json("/orders", &empty).await.unwrap().status, 422);
    let garbage = http.post_json("/orders", b"{not json").await.unwrap();
    assert!((400..500).contains(&garbage.status), "{}", garbage.status);
    serving.abort();
    orders.shutdown().await;
}

fn shop_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("shop")
}

/// A storefront process on `port`; waits until it says it is ready.
fn storefront_process(nats: &str, database: &str, port: u16) -> Child {
    let mut child = Command::new(shop_binary())
        .args([
            "--service",
            "storefront",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("NATS_URL", nats)
        .env("DATABASE_URL", database)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    choreo_examples::storefront::wait_ready(child.stdout.take().unwrap(), Duration::from_secs(60))
        .unwrap();
    child
}

fn kill(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storefront_killed_under_load_leaves_every_order_whole_or_absent() {
    const ORDERS: usize = 800;
    let nats = NatsServer::start().await.unwrap();
    let pg = PostgresServer::start().await.unwrap();
    let client = nats.connect().await.unwrap();
    let db = pool(&pg).await;
    // The tables, before any process races to make them.
    Ledger::open(&client, db.clone()).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut proc = storefront_process(&nats.url(), &pg.url(), port);

    // 16 clients post orders, each once: an answer 200/201 or a failure.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answered = Arc::new(Mutex::new(HashSet::new()));
    let failed = Arc::new(Mutex::new(HashSet::new()));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (next, answered, failed) = (next.clone(), answered.clone(), failed.clone());
        clients.spawn(async move {
            let mut http = HttpClient::new(addr);
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= ORDERS {
                    return;
                }
                let id = format!("k-{i}");
                match http.post_json("/orders", &new_order(&id)).await {
                    Ok(r) if r.status == 201 => {
                        answered.lock().unwrap().insert(id);
                    }
                    _ => {
                        failed.lock().unwrap().insert(id);
                        // Down: wait a little before the next order.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    // Kill it mid-load, start another on the same port.
    while next.load(std::sync::atomic::Ordering::Relaxed) < ORDERS / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(&mut proc);
    let mut proc = storefront_process(&nats.url(), &pg.url(), port);
    while clients.join_next().await.is_some() {}
    let (answered, failed) = (
        answered.lock().unwrap().clone(),
        failed.lock().unwrap().clone(),
    );
    assert!(
        !failed.is_empty(),
        "the kill cost no request: it hit nothing"
    );
    assert!(answered.len() > ORDERS / 2, "{} answered", answered.len());

    // Wait for the relay to publish what the killed process committed and
    // did not publish.
    let js = jetstream::new(client.clone());
    let started = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM choreo.outbox")
            .fetch_one(&db)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{left} rows stuck"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: HashSet<String> = sqlx::query_scalar::<_, String>("SELECT order_id FROM orders")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut events: HashMap<String, u32> = HashMap::new();
    let stream = js.get_stream("ORDERS").await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let order = m.subject.split('.').nth(1).unwrap().to_owned();
        *events.entry(order).or_insert(0) += 1;
    }
    for id in &answered {
        assert!(rows.contains(id), "{id} answered 201 and has no row");
        assert_eq!(events.get(id), Some(&1), "{id} answered 201");
    }
    for (id, n) in &events {
        assert_eq!(*n, 1, "{id} stored {n} times");
        assert!(rows.contains(id), "{id}'s event has no row");
    }
    let mut whole = 0;
    for id in &failed {
        assert_eq!(
            rows.contains(id),
            events.contains_key(id),
            "{id}: a failed request left a row without its event or an event without its row"
        );
        whole += usize::from(rows.contains(id));
    }
    println!(
        "{} answered, {} failed ({whole} of them committed and published anyway)",
        answered.len(),
        failed.len()
    );
    kill(&mut proc);
}
