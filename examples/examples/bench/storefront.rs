//! The storefront case: requests per second of `POST /orders` with the
//! outbox (the order row and the staged `OrderPlaced` in one transaction,
//! published at the commit) against the same endpoint doing the unsafe
//! write-then-publish, the storefront in a process of its own and this
//! process the load generator; and the latency from each order's commit to
//! its event stored.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo_examples::shop::{self, Ledger};
use choreo_postgres::sqlx;
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_testkit::{NatsServer, PostgresServer};
use futures::StreamExt;

use super::BoxError;

/// One side's run.
pub(super) struct Run {
    /// Requests per second.
    pub(super) rate: f64,
    /// Commit to stored, ms: p50, p99.
    pub(super) latency: (f64, f64),
}

/// The shop binary next to this one (`target/<profile>/examples/shop`).
fn shop_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("shop")))
        .unwrap_or_else(|| "shop".into())
}

/// `n` orders through a storefront process, with the outbox or (`unsafe_`)
/// committing then publishing.
pub(super) async fn post_orders(n: u64, unsafe_: bool) -> Result<Run, BoxError> {
    let nats = NatsServer::start().await?;
    let pg = PostgresServer::start().await?;
    let client = nats.connect().await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg.url())
        .await?;
    Ledger::open(&client, pool.clone()).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(shop_binary());
    cmd.args(["--service", "storefront", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("NATS_URL", nats.url())
        .env("DATABASE_URL", pg.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if unsafe_ {
        cmd.arg("--unsafe-direct-publish");
    }
    let mut child = Killed(cmd.spawn().map_err(|e| {
        format!(
            "cannot start the storefront ({}): build it with `cargo build --release -p choreo-examples --example shop`: {e}",
            shop_binary().display()
        )
    })?);
    ready(&mut child.0)?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // Warm up: the stream, the connections, the statements.
    post(addr, "warm", 200).await?;
    let started = Instant::now();
    post(addr, "timed", n).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let latency = commit_to_stored(&client, &pool, "timed-").await?;
    drop(child);
    Ok(Run { rate, latency })
}

/// Kills the storefront when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ready(child: &mut Child) -> Result<(), BoxError> {
    let out = child.stdout.take().ok_or("no stdout")?;
    Ok(choreo_examples::storefront::wait_ready(
        out,
        Duration::from_secs(60),
    )?)
}

/// Posts `n` orders `<run>-<i>` ([`shop::post_orders`]: 32 keep-alive
/// connections).
async fn post(addr: std::net::SocketAddr, run: &str, n: u64) -> Result<(), BoxError> {
    shop::post_orders(addr, run, n).await?;
    Ok(())
}

/// p50 and p99, ms, from each order's row time (`clock_timestamp()` at
/// its insert, just before its commit) to its event's stored time.
async fn commit_to_stored(
    client: &async_nats::Client,
    pool: &sqlx::PgPool,
    prefix: &str,
) -> Result<(f64, f64), BoxError> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT order_id, extract(epoch FROM created_at)::float8 * 1000 FROM orders
         WHERE left(order_id, length($1)) = $1",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    let committed: HashMap<String, f64> = rows.into_iter().collect();
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("ORDERS").await?;
    let mut msgs = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?
        .messages()
        .await?;
    let mut latencies = Vec::with_capacity(committed.len());
    let total = stream.cached_info().state.messages;
    for _ in 0..total {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .map_err(|_| "the ORDERS stream stopped short")?
            .ok_or("the ORDERS stream ended")??;
        let order = m.subject.split('.').nth(1).unwrap_or_default().to_owned();
        if let Some(at) = committed.get(&order) {
            let stored = m.info()?.published.unix_timestamp_nanos() as f64 / 1e6;
            latencies.push(stored - at);
        }
    }
    if latencies.is_empty() {
        return Err("no timed order's event was stored".into());
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok((at(0.5), at(0.99)))
}
