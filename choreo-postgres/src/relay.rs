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

/// How often the relay reports its outbox (in the registry bucket, for
/// `choreo status` and `choreo lint`, and as metrics).
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The longest a failed row waits before its next attempt.
const RETRY_AT_MOST: Duration = Duration::from_secs(30);

/// Rows the report counts at most (the count stays cheap in a backlog).
const COUNT_AT_MOST: i64 = 100_000;

/// The metric names (described once, by [`describe_metrics`]).
const PENDING: &str = "choreo_outbox_pending_rows";
const OLDEST: &str = "choreo_outbox_oldest_age_seconds";
const FAILING: &str = "choreo_outbox_failing_rows";
const RELAYED: &str = "choreo_outbox_relayed_total";
const RELAY_FAILURES: &str = "choreo_outbox_relay_failures_total";
/// Events an entry point's `Outbox::commit` published at once.
pub(crate) const PUBLISHED: &str = "choreo_outbox_published_total";

/// Describes the relay's metrics (help and unit) to the installed recorder.
pub(crate) fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_gauge!(
        PENDING,
        Unit::Count,
        "Outbox rows committed and not yet published, by service (as the relay last counted)."
    );
    metrics::describe_gauge!(
        OLDEST,
        Unit::Seconds,
        "How long the oldest unpublished outbox row has waited, by service."
    );
    metrics::describe_gauge!(
        FAILING,
        Unit::Count,
        "Outbox rows whose publish failed and that wait for a retry, by service."
    );
    metrics::describe_counter!(
        RELAYED,
        Unit::Count,
        "Outbox rows the relay published (a process had committed them and not published them)."
    );
    metrics::describe_counter!(
        PUBLISHED,
        Unit::Count,
        "Events an entry point staged and published at its commit (Outbox::commit), by service."
    );
    metrics::describe_counter!(
        RELAY_FAILURES,
        Unit::Count,
        "Outbox rows whose publish by the relay failed (kept and retried with a backoff)."
    );
}

/// Runs until the store is dropped.
pub(crate) async fn run(store: RelayHandle) {
    let mut pruned = Instant::now();
    let mut reported: Option<Instant> = None;
    loop {
        let Some(inner) = store.upgrade() else { return };
        // A pass that failed as a whole (the database, say); a row that
        // failed is reported from its own `last_error`.
        let mut full = false;
        let relay_error = match relay_once(&inner).await {
            Ok(Pass {
                published,
                failed,
                in_order,
            }) => {
                // A full batch, or keys' oldest rows (their next may be
                // due): look again at once.
                full = published + failed >= BATCH as u64 || (in_order > 0 && published > 0);
                if published + failed > 0 {
                    tracing::info!(
                        service = %inner.service,
                        published,
                        failed,
                        "relay: published emissions a process had committed but not published"
                    );
                }
                None
            }
            Err(e) => {
                tracing::warn!(service = %inner.service, error = %e, "relay: publishing the outbox failed; trying again");
                Some(e.to_string())
            }
        };
        if let Err(e) = crate::read_model::swap_caught_up(&inner.pool, &inner.js).await {
            tracing::warn!(service = %inner.service, error = %e, "relay: swapping in a rebuilt read model failed; trying again");
        }
        let prune_every = (inner.options.inbox_retention / 10).min(PRUNE_EVERY);
        if pruned.elapsed() >= prune_every {
            pruned = Instant::now();
            if let Err(e) = prune_inbox(&inner).await {
                tracing::warn!(service = %inner.service, error = %e, "relay: pruning the inbox failed; trying again");
            }
        }
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            reported = Some(Instant::now());
            if let Err(e) = report(&inner, relay_error).await {
                tracing::warn!(service = %inner.service, error = %e, "relay: cannot report the outbox; trying again");
            }
        }
        let every = inner.options.relay_every;
        drop(inner);
        if !full {
            tokio::time::sleep(every).await;
        }
    }
}

/// What one pass of the relay did.
pub(crate) struct Pass {
    /// Rows published and deleted.
    pub(crate) published: u64,
    /// Rows whose publish failed: kept, with the reason, for a later try.
    pub(crate) failed: u64,
    /// Rows of keys staged in order among those taken (each key's oldest
    /// only: the next may be due at once).
    pub(crate) in_order: u64,
}

/// One pass: publishes the rows older than the relay delay, oldest first,
/// and deletes them once the stream has them. A row the stream refuses
/// (gone, over its size limit) keeps its place with the reason and is
/// tried again after a backoff; the rows behind it go on.
pub(crate) async fn relay_once(inner: &Inner) -> Result<Pass, PgError> {
    let mut tx = inner
        .pool
        .begin()
        .await
        .map_err(PgError::sql("begin the relay"))?;
    let rows = sqlx::query(
        "SELECT seq, event_id::text AS event_id, subject, headers::text AS headers, payload,
                okey IS NOT NULL AS in_order
         FROM choreo.outbox o
         WHERE created_at < now() - make_interval(secs => $1)
           AND (retry_at IS NULL OR retry_at <= now())
           -- Of a key's events staged in order, only the oldest.
           AND (okey IS NULL OR NOT EXISTS (
                SELECT 1 FROM choreo.outbox p WHERE p.okey = o.okey AND p.seq < o.seq))
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
        return Ok(Pass {
            published: 0,
            failed: 0,
            in_order: 0,
        });
    }
    let mut sent = Vec::with_capacity(rows.len());
    let mut failed: Vec<(i64, String)> = Vec::new();
    let mut in_order = 0;
    for row in &rows {
        if row.try_get::<bool, _>("in_order").unwrap_or(false) {
            in_order += 1;
        }
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
        let headers = match headers_from_json(&headers) {
            Ok(h) => h,
            Err(e) => {
                failed.push((seq, format!("event {event_id}: unreadable headers: {e}")));
                continue;
            }
        };
        match inner
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
        {
            Ok(ack) => sent.push((seq, event_id, subject, ack)),
            Err(e) => failed.push((seq, format!("event {event_id} on {subject}: {e}"))),
        }
    }
    let mut published = Vec::with_capacity(sent.len());
    for (seq, event_id, subject, ack) in sent {
        match ack.await {
            Ok(_) => published.push(seq),
            Err(e) => failed.push((seq, format!("event {event_id} on {subject}: {e}"))),
        }
    }
    if !published.is_empty() {
        sqlx::query("DELETE FROM choreo.outbox WHERE seq = ANY($1)")
            .bind(&published)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("delete published outbox rows"))?;
    }
    for (seq, reason) in &failed {
        tracing::warn!(service = %inner.service, outbox_seq = seq, reason = %reason, "relay: an outbox row failed to publish; kept, and tried again after a backoff");
        sqlx::query(
            "UPDATE choreo.outbox
             SET attempts = attempts + 1, last_error = $2,
                 retry_at = now() + make_interval(secs => least($3, power(2, attempts)))
             WHERE seq = $1",
        )
        .bind(seq)
        .bind(reason)
        .bind(RETRY_AT_MOST.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("record an outbox row's failure"))?;
    }
    tx.commit()
        .await
        .map_err(PgError::sql("commit the relay"))?;
    let labels = [("service", inner.service.clone())];
    metrics::counter!(RELAYED, &labels).increment(published.len() as u64);
    metrics::counter!(RELAY_FAILURES, &labels).increment(failed.len() as u64);
    Ok(Pass {
        published: published.len() as u64,
        failed: failed.len() as u64,
        in_order,
    })
}

/// Counts the outbox and reports it: in the registry bucket (for `choreo
/// status` and `choreo lint`) and as gauges.
async fn report(inner: &Inner, relay_error: Option<String>) -> Result<(), PgError> {
    let (pending, failing, oldest_ms, row_error): (i64, i64, i64, Option<String>) = sqlx::query_as(
        "SELECT count(*),
                    count(*) FILTER (WHERE last_error IS NOT NULL),
                    coalesce((extract(epoch FROM now() - min(created_at)) * 1000)::bigint, 0),
                    (SELECT last_error FROM choreo.outbox WHERE last_error IS NOT NULL
                     ORDER BY seq DESC LIMIT 1)
             FROM (SELECT created_at, last_error FROM choreo.outbox LIMIT $1) o",
    )
    .bind(COUNT_AT_MOST)
    .fetch_one(&inner.pool)
    .await
    .map_err(PgError::sql("count the outbox"))?;
    let labels = [("service", inner.service.clone())];
    metrics::gauge!(PENDING, &labels).set(pending as f64);
    metrics::gauge!(OLDEST, &labels).set(oldest_ms as f64 / 1000.0);
    metrics::gauge!(FAILING, &labels).set(failing as f64);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let report = choreo::registry::OutboxReport::new(
        &inner.service,
        &inner.instance,
        pending.max(0) as u64,
        oldest_ms.max(0) as u64,
        failing.max(0) as u64,
        row_error.or(relay_error),
        ms(inner.options.relay_delay),
        ms(inner.options.relay_every),
    );
    choreo::registry::report_outbox(&inner.js, &report, inner.replicas)
        .await
        .map_err(PgError::Publish)
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
