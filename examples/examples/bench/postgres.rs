//! The Postgres case: a Postgres handler (its effect row, its inbox row and
//! its emission's outbox row in one transaction, then the publish and the
//! row's delete) against a hand-written async-nats + sqlx consumer doing the
//! same SQL in one transaction, the same publish and the same delete.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use choreo::{Context, HandlerError, Publisher, Service, State, event_handler};
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Pg, Postgres};
use choreo_testkit::{NatsServer, PostgresServer};
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::{
    BenchPlaced, BenchRelayed, BoxError, IN_FLIGHT, RawEvent, cbor, check_work, cpu_seconds,
    rate_until, raw_headers, raw_publish, raw_stream, v5,
};

/// The effect table both sides write.
const EFFECTS: &str =
    "CREATE TABLE IF NOT EXISTS bench_effects (id bigint NOT NULL, note text NOT NULL)";

#[event_handler(idempotent = false, emits = BenchRelayed)]
async fn pg_relay(e: BenchPlaced, ctx: Context, pg: Pg) -> Result<(), HandlerError> {
    effect_and_emit(e, &ctx, &pg).await.map(|_| ())
}

/// The Postgres side's work for one event: its effect row and its
/// emission, committed with its inbox row. `false`: committed before.
async fn effect_and_emit(e: BenchPlaced, ctx: &Context, pg: &Pg) -> Result<bool, HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(false);
    };
    sqlx::query("INSERT INTO bench_effects (id, note) VALUES ($1, $2)")
        .bind(e.id as i64)
        .bind(&e.note)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    ctx.emit(BenchRelayed {
        id: e.id,
        note: e.note,
    });
    tx.commit().await?;
    Ok(true)
}

/// A server pair and a pool with the effect table.
async fn servers() -> Result<(NatsServer, PostgresServer, PgPool), BoxError> {
    let nats = NatsServer::start().await?;
    let pg = PostgresServer::start().await?;
    let pool = PgPoolOptions::new()
        .max_connections(32)
        .connect(&pg.url())
        .await?;
    sqlx::query(EFFECTS).execute(&pool).await?;
    Ok((nats, pg, pool))
}

/// `n` events through a Postgres handler.
pub(super) async fn choreo_pg(n: u64) -> Result<f64, BoxError> {
    let (nats, _pg, pool) = servers().await?;
    let client = nats.connect().await?;
    let publisher = Publisher::new(client.clone(), "bench")?;
    publisher.ensure_stream::<BenchPlaced>().await?;
    publisher.ensure_stream::<BenchRelayed>().await?;
    super::raw_publish(&jetstream::new(client.clone()), "bench", "BenchPlaced", n).await?;
    let store = Postgres::start(pool.clone(), &publisher).await?;
    let started = (Instant::now(), cpu_seconds());
    let handle = Service::new("relay")
        .state(store)
        .handler(pg_relay)
        .start(client.clone())
        .await?;
    let stats = || handle.stats("pg_relay").map_or(0, |s| s.handled());
    let rate = rate_until(stats, n, "choreo postgres handler", started).await?;
    check_work(
        &jetstream::new(client),
        "choreo",
        <BenchRelayed as choreo::Event>::STREAM,
        n,
        None,
    )
    .await?;
    check_rows(&pool, "choreo", n).await?;
    handle.shutdown().await;
    Ok(rate)
}

/// The same by hand, with the same tables and indexes as choreo's (the
/// inbox must be pruned by age, so its time is indexed). It deletes each
/// published row right after its publish, as a hand-written relay would;
/// choreo batches the deletes in the background.
pub(super) async fn raw_pg(n: u64) -> Result<f64, BoxError> {
    let (nats, _pg, pool) = servers().await?;
    sqlx::raw_sql(
        "CREATE TABLE raw_inbox (handler text NOT NULL, event_id uuid NOT NULL,
             handled_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (handler, event_id));
         CREATE INDEX raw_inbox_handled_at ON raw_inbox USING brin (handled_at);
         CREATE TABLE raw_outbox (seq bigserial PRIMARY KEY, event_id uuid NOT NULL,
             subject text NOT NULL, headers text NOT NULL, payload bytea NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let js = jetstream::new(nats.connect().await?);
    raw_stream(&js, "RAWIN", "rawin.>").await?;
    raw_stream(&js, "RAWOUT", "rawout.>").await?;
    raw_publish(&js, "rawin", "BenchPlaced", n).await?;
    let done = Arc::new(AtomicU64::new(0));
    let started = (Instant::now(), cpu_seconds());
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream("RAWIN")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("relay".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 5,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(IN_FLIGHT)
        .messages()
        .await?;
    let task = {
        let (js, pool, done) = (js.clone(), pool.clone(), done.clone());
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut handling = tokio::task::JoinSet::new();
            while let Some(Ok(msg)) = messages.next().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                while handling.try_join_next().is_some() {}
                let (js, pool, done) = (js.clone(), pool.clone(), done.clone());
                handling.spawn(async move {
                    match raw_handle(&js, &pool, &msg).await {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("raw postgres relay: {e}");
                            let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                        }
                    }
                    drop(permit);
                });
            }
        })
    };
    let rate = rate_until(
        || done.load(Ordering::Relaxed),
        n,
        "raw postgres handler",
        started,
    )
    .await?;
    task.abort();
    check_work(&js, "raw", "RAWOUT", n, None).await?;
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_effects")
        .fetch_one(&pool)
        .await?;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM raw_outbox")
        .fetch_one(&pool)
        .await?;
    if effects != n as i64 || left != 0 {
        return Err(format!("raw: {effects} effect rows, {left} outbox rows left").into());
    }
    Ok(rate)
}

/// One event by hand: the inbox row, the effect and the outbox row in one
/// transaction; then the publish, the row's delete, the ack.
async fn raw_handle(
    js: &jetstream::Context,
    pool: &PgPool,
    msg: &jetstream::Message,
) -> Result<(), BoxError> {
    let h = msg.headers.as_ref().ok_or("no headers")?;
    let cause = h.get("ce-id").ok_or("no ce-id")?.as_str().to_owned();
    let corr = h
        .get("ce-correlationid")
        .ok_or("no ce-correlationid")?
        .as_str()
        .to_owned();
    let e: RawEvent = ciborium::from_reader(&msg.payload[..])?;
    let mut tx = pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO raw_inbox (handler, event_id) VALUES ('relay.relay', $1::uuid)
         ON CONFLICT DO NOTHING",
    )
    .bind(&cause)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        msg.ack().await?;
        return Ok(());
    }
    sqlx::query("INSERT INTO bench_effects (id, note) VALUES ($1, $2)")
        .bind(e.id as i64)
        .bind(&e.note)
        .execute(&mut *tx)
        .await?;
    let id = v5(&[
        b"emit",
        b"relay.relay",
        cause.as_bytes(),
        b"BenchRelayed",
        b"0",
    ])
    .to_string();
    let headers = raw_headers(&id, "BenchRelayed", "raw", &corr, Some(&cause));
    let subject = format!("rawout.{}.seen", e.id);
    let payload = cbor(&RawEvent {
        id: e.id,
        note: e.note,
    });
    let pairs: Vec<(String, String)> = headers
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (k.to_string(), v.as_str().to_owned()))
        })
        .collect();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO raw_outbox (event_id, subject, headers, payload)
         VALUES ($1::uuid, $2, $3, $4) RETURNING seq",
    )
    .bind(&id)
    .bind(&subject)
    .bind(serde_json::to_string(&pairs)?)
    .bind(payload.to_vec())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    js.publish_with_headers(subject, headers, payload)
        .await?
        .await?;
    sqlx::query("DELETE FROM raw_outbox WHERE seq = $1")
        .bind(seq)
        .execute(pool)
        .await?;
    msg.ack().await?;
    Ok(())
}

/// Fails unless the run left `n` effect rows and an empty outbox (within
/// two seconds: published rows are deleted in batches a moment after
/// their publish, and the relay, 5 s behind, is not what empties it).
async fn check_rows(pool: &PgPool, side: &str, n: u64) -> Result<(), BoxError> {
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_effects")
        .fetch_one(pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let left = loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM choreo.outbox")
            .fetch_one(pool)
            .await?;
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if effects != n as i64 || left != 0 {
        return Err(format!("{side}: {effects} effect rows, {left} outbox rows left").into());
    }
    Ok(())
}

/// When each event's transaction committed, Unix ms, by event number.
#[derive(Clone, Default)]
struct Committed(Arc<std::sync::Mutex<std::collections::HashMap<u64, f64>>>);

#[event_handler(idempotent = false, emits = BenchRelayed)]
async fn pg_timed(
    e: BenchPlaced,
    ctx: Context,
    pg: Pg,
    State(committed): State<Committed>,
) -> Result<(), HandlerError> {
    let id = e.id;
    if effect_and_emit(e, &ctx, &pg).await?
        && let Ok(mut c) = committed.0.lock()
    {
        c.insert(id, now_ms());
    }
    Ok(())
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// p50 and p99 of `xs`.
fn p50_p99(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((xs.len() as f64 * q) as usize).min(xs.len() - 1)];
    (at(0.50), at(0.99))
}

/// Reads the first `count` emissions of the relayed stream and gives the
/// latency from `committed` (ms) to the stored timestamp of each it has.
async fn stored_latencies(
    js: &jetstream::Context,
    count: usize,
    committed: &std::collections::HashMap<u64, f64>,
) -> Result<Vec<f64>, BoxError> {
    let stream = js
        .get_stream(<BenchRelayed as choreo::Event>::STREAM)
        .await?;
    let mut msgs = stream
        .create_consumer(pull::OrderedConfig::default())
        .await?
        .messages()
        .await?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let msg = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .map_err(|_| "the relayed stream stopped short")?
            .ok_or("the relayed stream ended")??;
        let e: RawEvent = ciborium::from_reader(&msg.payload[..])?;
        let stored = msg.info()?.published.unix_timestamp_nanos() as f64 / 1e6;
        if let Some(at) = committed.get(&e.id) {
            out.push(stored - at);
        }
    }
    Ok(out)
}

/// The latency from a Postgres handler's commit to its emission stored
/// (choreo publishes right after the commit), at `rate` events/s; then
/// from the commit of rows a process left in the outbox (it died between
/// its commit and its publish) to the relay's stored copy, with the
/// default relay options. Returns ((p50, p99) handler, (p50, p99) relay),
/// ms.
pub(super) async fn commit_to_stored(
    n: u64,
    rate: u64,
) -> Result<((f64, f64), (f64, f64)), BoxError> {
    let (nats, _pg, pool) = servers().await?;
    let client = nats.connect().await?;
    let js = jetstream::new(client.clone());
    let publisher = Publisher::new(client.clone(), "bench")?;
    publisher.ensure_stream::<BenchPlaced>().await?;
    publisher.ensure_stream::<BenchRelayed>().await?;
    let store = Postgres::start(pool.clone(), &publisher).await?;
    let committed = Committed::default();
    let handle = Service::new("timed")
        .state(store.clone())
        .state(committed.clone())
        .handler(pg_timed)
        .start(client.clone())
        .await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for id in 0..n {
        tick.tick().await;
        publisher
            .publish(&BenchPlaced {
                id,
                note: "timed".into(),
            })
            .await?;
    }
    let start = Instant::now();
    while handle.stats("pg_timed").map_or(0, |s| s.handled()) < n {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the timed Postgres handler did not finish".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await;
    let handler = {
        let c = committed.0.lock().map_err(|_| "poisoned")?.clone();
        p50_p99(stored_latencies(&js, n as usize, &c).await?)
    };

    // Rows a process committed and did not publish, at the same pace.
    let relayed = n.min(300);
    let mut left = std::collections::HashMap::new();
    for i in 0..relayed {
        tick.tick().await;
        let id = 1_000_000 + i;
        let event_id = v5(&[b"left", &id.to_be_bytes()]).to_string();
        let headers = raw_headers(&event_id, "BenchRelayed", "bench", &event_id, None);
        let pairs: Vec<(String, String)> = headers
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| (k.to_string(), v.as_str().to_owned()))
            })
            .collect();
        let payload = cbor(&RawEvent {
            id,
            note: "left".into(),
        });
        sqlx::query(
            "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload)
             VALUES ($1::uuid, 'BenchRelayed', $2, $3::jsonb, $4)",
        )
        .bind(&event_id)
        .bind(format!("benchout.{id}.relayed"))
        .bind(serde_json::to_string(&pairs)?)
        .bind(payload.to_vec())
        .execute(&pool)
        .await?;
        left.insert(id, now_ms());
    }
    let all = stored_latencies(&js, n as usize + relayed as usize, &left).await?;
    let relay = p50_p99(all);
    drop(store);
    Ok((handler, relay))
}
