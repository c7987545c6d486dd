//! [`Outbox`]: events published from an entry point (a web request, a
//! command) without a dual write. The event is staged in the caller's own
//! transaction, with the rows it writes; [`Outbox::commit`] commits that
//! transaction and publishes the staged events at once; a process that dies
//! in between leaves them to the relay, which publishes them a few seconds
//! later. A transaction rolled back publishes nothing.

use choreo::{BatchOutcome, Emission, Event, EventId, Publisher};
use sqlx::{PgConnection, Postgres as Pg};

use crate::error::PgError;
use crate::relay::headers_to_json;
use crate::store::Postgres;

/// Stages events in the caller's transaction and publishes them once it
/// has committed. Made by [`Postgres::outbox`]; cheap to clone.
///
/// ```no_run
/// # use choreo::event;
/// # #[event(subject = "orders.{order_id}.placed", key = order_id)]
/// # pub struct OrderPlaced { pub order_id: String }
/// # async fn demo(postgres: choreo_postgres::Postgres, publisher: choreo::Publisher)
/// #     -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = postgres.outbox(&publisher);
/// let mut tx = postgres.pool().begin().await?;
/// sqlx::query("INSERT INTO orders (order_id) VALUES ($1)")
///     .bind("o-1")
///     .execute(&mut *tx)
///     .await?;
/// let staged = outbox.stage(&mut tx, &OrderPlaced { order_id: "o-1".into() }).await?;
/// // Commits the order row and the staged event together, then publishes.
/// outbox.commit(tx, staged).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Postgres,
    publisher: Publisher,
}

/// Events staged in a transaction, to hand to [`Outbox::commit`] with it.
/// Dropped instead (the transaction committed some other way), they are
/// published by the relay after its delay.
#[must_use = "commit the transaction with Outbox::commit, or the staged events wait for the relay"]
#[derive(Debug, Default)]
pub struct Staged {
    rows: Vec<Row>,
}

/// One staged event: its row's sequence, the event, and its ordering key
/// if it was staged in key order.
#[derive(Debug)]
struct Row {
    seq: i64,
    event: Emission,
    key: Option<String>,
}

impl Staged {
    /// The staged events' ids, in the order they were staged.
    pub fn event_ids(&self) -> Vec<EventId> {
        self.rows.iter().map(|r| r.event.event_id).collect()
    }

    /// These events and then `other`'s.
    pub fn and(mut self, other: Staged) -> Staged {
        self.rows.extend(other.rows);
        self
    }
}

/// What [`Outbox::commit`] did once the transaction committed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Committed {
    /// The committed events' ids, in the order they were staged.
    pub event_ids: Vec<EventId>,
    /// Whether they were published at once. `false`: the publish failed
    /// (the reason is logged); the relay publishes them after its delay.
    pub published: bool,
}

impl Postgres {
    /// An outbox for entry points that publishes through `publisher` (its
    /// source is the events' `ce-source`).
    pub fn outbox(&self, publisher: &Publisher) -> Outbox {
        Outbox {
            store: self.clone(),
            publisher: publisher.clone(),
        }
    }
}

impl Outbox {
    /// Writes `event`, encoded with its final id and headers (a keyed
    /// event's id is deterministic, so staging it again in another request
    /// publishes nothing new), into the outbox table inside `tx`. The row
    /// commits or rolls back with the caller's own rows.
    ///
    /// # Errors
    /// The event cannot be encoded or is over the server's size limit, its
    /// stream cannot be made, or the database refused.
    pub async fn stage<E: Event>(
        &self,
        tx: &mut PgConnection,
        event: &E,
    ) -> Result<Staged, PgError> {
        self.insert(tx, event, None).await
    }

    /// [`stage`](Self::stage), in the order of `key` (an order id, an
    /// account): the events staged for one key are stored in the order they
    /// were staged, whoever publishes them. Transactions staging one key
    /// take turns (a lock on the key until they end), so staging order is
    /// commit order; an event is published at the commit only when no
    /// older event of its key waits, else the relay publishes the key's
    /// events oldest first. Order costs that wait: under contention on a
    /// key, events can wait for the relay's delay.
    ///
    /// # Errors
    /// As [`stage`](Self::stage).
    pub async fn stage_in_order<E: Event>(
        &self,
        tx: &mut PgConnection,
        key: &str,
        event: &E,
    ) -> Result<Staged, PgError> {
        self.insert(tx, event, Some(key)).await
    }

    async fn insert<E: Event>(
        &self,
        tx: &mut PgConnection,
        event: &E,
        key: Option<&str>,
    ) -> Result<Staged, PgError> {
        let e = self
            .publisher
            .prepare(event)
            .await
            .map_err(|e| PgError::Publish(e.to_string()))?;
        // With a key: the key's lock first, held to the transaction's end;
        // without, a plain insert (the common case, and the cheaper plan).
        let sql = if key.is_some() {
            "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload, okey)
             SELECT $1::uuid, $2, $3, $4, $5, $6
             FROM (SELECT pg_advisory_xact_lock(hashtextextended('choreo.outbox:' || $6, 0))) AS turn
             RETURNING seq"
        } else {
            "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload, okey)
             VALUES ($1::uuid, $2, $3, $4, $5, $6)
             RETURNING seq"
        };
        let seq: i64 = sqlx::query_scalar(sql)
            .bind(e.event_id.to_string())
            .bind(e.event_type)
            .bind(&e.subject)
            .bind(headers_to_json(&e.headers))
            .bind(&e.payload[..])
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(PgError::sql("stage an event in the outbox"))?;
        Ok(Staged {
            rows: vec![Row {
                seq,
                event: e,
                key: key.map(str::to_owned),
            }],
        })
    }

    /// Commits `tx`, then publishes what was staged in it, in the order it
    /// was staged: several events of one stream as one atomic batch
    /// (nats-server 2.12+ and a stream with `allow_atomic`; else one by
    /// one, each awaited before the next), and has their rows deleted. A publish
    /// that fails after the commit is no error: the events are committed,
    /// and the relay publishes them after its delay.
    ///
    /// # Errors
    /// The commit failed: nothing was written, nothing is published.
    pub async fn commit(
        &self,
        tx: sqlx::Transaction<'_, Pg>,
        staged: Staged,
    ) -> Result<Committed, PgError> {
        tx.commit()
            .await
            .map_err(PgError::sql("commit the transaction"))?;
        let event_ids = staged.event_ids();
        let published = self.publish(staged).await;
        Ok(Committed {
            event_ids,
            published,
        })
    }

    /// Publishes committed rows and deletes them; `false` if a publish
    /// failed or an event waits for an older one of its key (the rest are
    /// left to the relay).
    async fn publish(&self, staged: Staged) -> bool {
        let total = staged.rows.len();
        // A key's event goes only when no older one of its key waits; the
        // rest of the transaction's events go after it, so none of them.
        for row in &staged.rows {
            let Some(key) = &row.key else { continue };
            match self.older_waits(key, row.seq).await {
                Ok(false) => {}
                Ok(true) => {
                    tracing::debug!(event_id = %row.event.event_id, key = %key, "outbox: an older event of the key waits; the relay publishes these after it");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(event_id = %row.event.event_id, error = %e, "outbox: cannot tell whether an older event of the key waits; the relay will publish these");
                    return false;
                }
            }
        }
        let in_order: Vec<i64> = staged
            .rows
            .iter()
            .filter(|r| r.key.is_some())
            .map(|r| r.seq)
            .collect();
        let seqs: Vec<i64> = staged.rows.iter().map(|r| r.seq).collect();
        let one_stream = staged
            .rows
            .iter()
            .all(|r| r.event.stream == staged.rows[0].event.stream);
        let published = if total > 1 && one_stream {
            self.publish_batch(staged.rows).await
        } else {
            self.publish_each(staged.rows).await
        };
        metrics::counter!(crate::relay::PUBLISHED, "service" => self.store.inner.service.clone())
            .increment(published as u64);
        let done = &seqs[..published];
        let (ordered, plain): (Vec<i64>, Vec<i64>) =
            done.iter().partition(|seq| in_order.contains(seq));
        if !ordered.is_empty() {
            // Deleted before the answer: the key's next event, staged
            // right after, must not find these waiting.
            let deleted = sqlx::query("DELETE FROM choreo.outbox WHERE seq = ANY($1)")
                .bind(&ordered)
                .execute(self.store.pool())
                .await;
            if let Err(e) = deleted {
                tracing::warn!(error = %e, "outbox: cannot delete published rows; the relay will publish them again (the stream drops the copies)");
            }
        }
        if !plain.is_empty() {
            self.store.forget_published(plain);
        }
        published == total
    }

    /// A transaction's events of one stream as one atomic batch; one by
    /// one where the server or the stream takes no batches. Returns how
    /// many were stored (all or none of a batch).
    async fn publish_batch(&self, rows: Vec<Row>) -> usize {
        let events: Vec<Emission> = rows.iter().map(|r| r.event.clone()).collect();
        let n = events.len();
        match self.publisher.publish_atomic(events).await {
            BatchOutcome::Stored(_) => n,
            BatchOutcome::NotAtomic(why) => {
                tracing::debug!(reason = %why, stream = rows[0].event.stream, "outbox: the stream takes no atomic batches; publishing one by one");
                self.publish_each(rows).await
            }
            BatchOutcome::Refused(why) | BatchOutcome::Unknown(why) => {
                tracing::warn!(reason = %why, events = n, "outbox: the atomic batch of a committed transaction was not stored; the relay will publish its events");
                0
            }
            other => {
                tracing::warn!(outcome = ?other, "outbox: an atomic batch ended unexpectedly; the relay will publish its events");
                0
            }
        }
    }

    /// Events one by one, each awaited before the next; returns how many
    /// were stored before one failed.
    async fn publish_each(&self, rows: Vec<Row>) -> usize {
        let js = self.publisher.js();
        let mut stored = 0;
        for row in rows {
            let e = row.event;
            let sent = match js
                .publish_with_headers(e.subject.clone(), e.headers, e.payload)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            };
            if let Err(reason) = sent {
                tracing::warn!(event_id = %e.event_id, event = e.event_type, subject = %e.subject, error = %reason, "outbox: publishing a committed event failed; the relay will publish it");
                break;
            }
            stored += 1;
        }
        stored
    }

    /// Whether an event of `key` older than `seq` waits in the outbox.
    async fn older_waits(&self, key: &str, seq: i64) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM choreo.outbox WHERE okey = $1 AND seq < $2)",
        )
        .bind(key)
        .bind(seq)
        .fetch_one(self.store.pool())
        .await
    }
}
