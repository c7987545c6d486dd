//! The relay: publishes outbox rows that a process committed but did not
//! get to publish (it died between its commit and its publish), and keeps
//! the inbox to its retention. It runs in every instance; `FOR UPDATE SKIP
//! LOCKED` gives each row to one of them.

use std::time::{Duration, Instant};

use choreo::async_nats::HeaderMap;
use sqlx::Row;

use crate::error::PgError;
use crate::store::{Inner, RelayHandle};

/// How many rows one pass of the relay takes at most.
const BATCH: i64 = 256;

/// How many inbox rows one delete removes at most (bounded, so it never
/// holds locks long).
const PRUNE_BATCH: i64 = 1000;

/// The longest time between two prunes of the inbox; a retention shorter
/// than ten of these is pruned every tenth of it, so the table holds at
/// most about 1.1 retentions' worth of rows.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Runs until the store is dropped.
pub(crate) async fn run(store: RelayHandle) {
    let mut pruned = Instant::now();
    loop {
        let Some(inner) = store.upgrade() else { return };
        match relay_once(&inner).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                published = n,
                "relay: published emissions a process had committed but not published"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "relay: publishing the outbox failed; trying again")
            }
        }
        match crate::read_model::swap_caught_up(&inner.pool, &inner.js).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "relay: swapping in a rebuilt read model failed; trying again")
            }
        }
        let prune_every = (inner.options.inbox_retention / 10).min(PRUNE_EVERY);
        if pruned.elapsed() >= prune_every {
            pruned = Instant::now();
            if let Err(e) = prune_inbox(&inner).await {
                tracing::warn!(error = %e, "relay: pruning the inbox failed; trying again");
            }
        }
        let every = inner.options.relay_every;
        drop(inner);
        tokio::time::sleep(every).await;
    }
}

/// One pass: publishes the rows older than the relay delay, oldest first,
/// and deletes them once the stream has them. Returns how many.
pub(crate) async fn relay_once(inner: &Inner) -> Result<u64, PgError> {
    let mut tx = inner
        .pool
        .begin()
        .await
        .map_err(PgError::sql("begin the relay"))?;
    let rows = sqlx::query(
        "SELECT seq, event_id::text AS event_id, subject, headers::text AS headers, payload
         FROM choreo.outbox
         WHERE created_at < now() - make_interval(secs => $1)
         ORDER BY seq
         LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(inner.options.relay_delay.as_secs_f64())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await
    .map_err(PgError::sql("read the outbox"))?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut seqs = Vec::with_capacity(rows.len());
    let mut acks = Vec::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row
            .try_get("seq")
            .map_err(PgError::sql("read an outbox row"))?;
        let event_id: String = row
            .try_get("event_id")
            .map_err(PgError::sql("read an outbox row"))?;
        let subject: String = row
            .try_get("subject")
            .map_err(PgError::sql("read an outbox row"))?;
        let headers: String = row
            .try_get("headers")
            .map_err(PgError::sql("read an outbox row"))?;
        let payload: Vec<u8> = row
            .try_get("payload")
            .map_err(PgError::sql("read an outbox row"))?;
        let headers = headers_from_json(&headers).map_err(|e| {
            PgError::Schema(format!(
                "outbox row {seq} (event {event_id}) has unreadable headers: {e}"
            ))
        })?;
        let ack = inner
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| PgError::Publish(format!("event {event_id}: {e}")))?;
        acks.push((event_id, ack));
        seqs.push(seq);
    }
    for (event_id, ack) in acks {
        ack.await
            .map_err(|e| PgError::Publish(format!("event {event_id}: {e}")))?;
    }
    sqlx::query("DELETE FROM choreo.outbox WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("delete published outbox rows"))?;
    tx.commit()
        .await
        .map_err(PgError::sql("commit the relay"))?;
    Ok(seqs.len() as u64)
}

/// Deletes inbox rows older than the retention, in bounded batches.
async fn prune_inbox(inner: &Inner) -> Result<u64, PgError> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM choreo.inbox WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM choreo.inbox
                 WHERE handled_at < now() - make_interval(secs => $1)
                 LIMIT $2))",
        )
        .bind(inner.options.inbox_retention.as_secs_f64())
        .bind(PRUNE_BATCH)
        .execute(&inner.pool)
        .await
        .map_err(PgError::sql("prune the inbox"))?
        .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Headers as the outbox stores them: a JSON array of `[name, value]`.
pub(crate) fn headers_to_json(headers: &HeaderMap) -> String {
    let pairs: Vec<(String, String)> = headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().to_owned()))
        })
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

fn headers_from_json(text: &str) -> Result<HeaderMap, serde_json::Error> {
    let pairs: Vec<(String, String)> = serde_json::from_str(text)?;
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(name.as_str(), value.as_str());
    }
    Ok(headers)
}
