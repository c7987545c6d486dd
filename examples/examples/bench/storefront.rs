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
    /// Where its requests spent their time.
    pub(super) cost: Cost,
}

/// Where one side's requests spent their time: CPU per request, µs, of
/// the storefront, Postgres (every process of the server), nats-server
/// and the load generator (this process); Postgres transactions that
/// wrote, per request; and the machine's stolen share.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Cost {
    pub(super) storefront: f64,
    pub(super) postgres: f64,
    pub(super) nats: f64,
    pub(super) load: f64,
    pub(super) commits: f64,
    /// The machine's CPU time stolen by the hypervisor meanwhile, percent.
    pub(super) stolen: f64,
}

impl Cost {
    /// One line for the side called `side`.
    pub(super) fn line(&self, side: &str) -> String {
        format!(
            "    storefront {side} per request: CPU storefront {:.0} µs, postgres {:.0} µs, nats-server {:.0} µs, load generator {:.0} µs; postgres write transactions {:.2}; stolen {:.0}%",
            self.storefront, self.postgres, self.nats, self.load, self.commits, self.stolen
        )
    }
}

/// CPU seconds of `pid` and every process below it (Postgres serves each
/// connection from a child of the postmaster).
fn tree_cpu(pid: u32) -> f64 {
    let mut total = super::process_cpu(&pid.to_string());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += super::process_cpu(child);
        }
    }
    total
}

/// The counters a side's cost is the difference of.
#[derive(Clone, Copy, Debug)]
struct Counters {
    storefront: f64,
    postgres: f64,
    nats: f64,
    load: f64,
    commits: f64,
    /// The machine's reading, for the share stolen since.
    machine: super::Cpu,
}

impl Counters {
    async fn read(
        storefront: u32,
        pg: &PostgresServer,
        nats: &NatsServer,
        pool: &sqlx::PgPool,
    ) -> Counters {
        // Every transaction that writes takes a transaction id (this
        // query too: one of thousands).
        let commits: i64 = sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(pool)
            .await
            .unwrap_or(0);
        Counters {
            storefront: super::process_cpu(&storefront.to_string()),
            postgres: pg.pid().map_or(0.0, tree_cpu),
            nats: nats
                .pid()
                .map_or(0.0, |p| super::process_cpu(&p.to_string())),
            load: super::process_cpu("self"),
            commits: commits as f64,
            machine: super::cpu_seconds(),
        }
    }

    fn per_request(&self, later: &Counters, n: u64) -> Cost {
        let us = |a: f64, b: f64| (b - a) * 1e6 / n.max(1) as f64;
        Cost {
            storefront: us(self.storefront, later.storefront),
            postgres: us(self.postgres, later.postgres),
            nats: us(self.nats, later.nats),
            load: us(self.load, later.load),
            commits: (later.commits - self.commits) / n.max(1) as f64,
            stolen: self.machine.stolen_since(),
        }
    }
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
    let before = Counters::read(child.0.id(), &pg, &nats, &pool).await;
    let started = Instant::now();
    post(addr, "timed", n).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // The deletes of published rows trail the answers by a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cost = before.per_request(&Counters::read(child.0.id(), &pg, &nats, &pool).await, n);
    let latency = commit_to_stored(&client, &pool, "timed-").await?;
    drop(child);
    Ok(Run {
        rate,
        latency,
        cost,
    })
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
