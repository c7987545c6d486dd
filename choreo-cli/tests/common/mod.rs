//! What the `choreo dlq` and `choreo replay` tests share: a billing flow
//! (an invoice requested, billed, then mailed), its observable effects, and
//! running the `choreo` binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use choreo::{Publisher, StreamSettings, event};
use choreo_examples::shop::{self, Ledger, SERVICES};
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_testkit::{NatsServer, PostgresServer};

#[event(subject = "invoices.{order_id}.requested", key = order_id)]
pub struct InvoiceRequested {
    pub order_id: String,
    pub amount: u64,
}

#[event(subject = "billed.{order_id}.done", key = order_id)]
pub struct Billed {
    pub order_id: String,
    pub amount: u64,
}

/// What the handlers did.
#[derive(Clone, Default)]
pub struct World {
    /// While set, billing fails permanently.
    pub bug: Arc<AtomicBool>,
    /// Successful runs of billing, by order.
    pub billed: Arc<Mutex<HashMap<String, u32>>>,
    /// Mails sent downstream, by order: how many, and the last amount.
    pub mailed: Arc<Mutex<HashMap<String, (u32, u64)>>>,
    /// A read model billing builds: the amount billed per order.
    pub ledger: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    /// Billing runs that were replays.
    pub replays_seen: Arc<AtomicU32>,
}

/// Runs `choreo -s <server> <args>`: exit code, stdout, stderr.
pub fn choreo(server: &NatsServer, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["-s", &server.url()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `ok` every 50 ms for up to 20 s.
pub async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..400 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Starts service `name` with handler `h` and the world as its state.
pub async fn start<H: choreo::Handler>(
    client: &choreo::async_nats::Client,
    name: &str,
    w: &World,
    h: H,
) -> choreo::ServiceHandle {
    choreo::Service::new(name)
        .state(w.clone())
        .handler(h)
        .start(client.clone())
        .await
        .unwrap()
}

/// Publishes `n` invoices for orders `<prefix>-0`, `<prefix>-1`, ...
pub async fn request(shop: &choreo::Publisher, prefix: &str, n: u32, amount: u64) {
    for i in 0..n {
        shop.publish(&InvoiceRequested {
            order_id: format!("{prefix}-{i}"),
            amount,
        })
        .await
        .unwrap();
    }
}

/// The shop's four services on `client` and a Postgres of their own, and
/// `n` orders of run `run`.
pub async fn run_shop(
    client: &choreo::async_nats::Client,
    run: &str,
    n: u64,
) -> (Vec<(&'static str, choreo::ServiceHandle)>, PostgresServer) {
    let pg = PostgresServer::start().await.unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&pg.url())
        .await
        .unwrap();
    let ledger = Ledger::open(client, pool).await.unwrap();
    let mut handles = Vec::new();
    for name in SERVICES {
        let h = shop::service(name, ledger.clone(), StreamSettings::default())
            .await
            .unwrap()
            .start(client.clone())
            .await
            .unwrap();
        handles.push((name, h));
    }
    let publisher = Publisher::new(client.clone(), "storefront").unwrap();
    shop::place_orders(&publisher, run, n).await.unwrap();
    (handles, pg)
}
