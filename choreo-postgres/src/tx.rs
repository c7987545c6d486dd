//! [`Pg`]: a handler's transaction in the service's Postgres, with the
//! event claimed in the inbox and the emissions stored in the outbox of the
//! same transaction.

use choreo::{Context, FromContext, HandlerError, MissingState, State, States};
use sqlx::{PgConnection, PgPool};

use crate::relay::headers_to_json;
use crate::store::Postgres;

/// A handler argument that runs the handler's writes in one Postgres
/// transaction with its inbox row and its emissions (register the store
/// with `Service::state(postgres)`):
///
/// ```no_run
/// # use choreo::{event, event_handler, Context, HandlerError};
/// # #[event(subject = "orders.{order_id}.placed")]
/// # pub struct OrderPlaced { pub order_id: String, pub cents: i64 }
/// # #[event(subject = "payments.{order_id}.captured")]
/// # pub struct PaymentCaptured { pub order_id: String }
/// use choreo_postgres::Pg;
///
/// #[event_handler(idempotent = false)]
/// async fn charge(order: OrderPlaced, ctx: Context, pg: Pg) -> Result<(), HandlerError> {
///     // `None`: a copy of an event this handler committed before.
///     let Some(mut tx) = pg.begin().await? else { return Ok(()) };
///     sqlx::query("INSERT INTO charges (order_id, cents) VALUES ($1, $2)")
///         .bind(&order.order_id)
///         .bind(order.cents)
///         .execute(tx.conn())
///         .await
///         .map_err(HandlerError::retryable)?;
///     ctx.emit(PaymentCaptured { order_id: order.order_id });
///     tx.commit().await
/// }
/// ```
///
/// [`begin`](Self::begin) opens the transaction and inserts the inbox row
/// `(handler, event id)`: a copy of an event whose transaction committed
/// finds the row and gets `None`; two instances running the same event at
/// once both insert, and the second waits on the row's unique key until the
/// first commits (then it gets `None`) or rolls back (then it runs).
/// [`PgTx::commit`] writes what the handler emitted so far into the outbox
/// and commits; choreo then publishes the emissions, deletes their outbox
/// rows, and acknowledges the event. A process that dies between the commit
/// and the publish leaves the rows to the relay. Such a handler needs no
/// JetStream inbox (`idempotent = false`).
pub struct Pg {
    store: Postgres,
    ctx: Context,
}

impl Pg {
    /// Opens the handler's transaction with the event claimed in the inbox,
    /// or `None` when this handler committed the event before.
    ///
    /// # Errors
    /// The database refused (retryable).
    pub async fn begin(&self) -> Result<Option<PgTx>, HandlerError> {
        let mut tx = self
            .store
            .pool()
            .begin()
            .await
            .map_err(HandlerError::retryable)?;
        let claimed = sqlx::query(
            "INSERT INTO choreo.inbox (handler, event_id) VALUES ($1, $2::uuid)
             ON CONFLICT DO NOTHING",
        )
        .bind(self.ctx.handler_id())
        .bind(self.ctx.event_id().to_string())
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::retryable)?
        .rows_affected();
        if claimed == 0 {
            tracing::info!(
                event_id = %self.ctx.event_id(),
                handler = self.ctx.handler_id(),
                "already committed for this event (postgres inbox); skipped"
            );
            return Ok(None);
        }
        Ok(Some(PgTx {
            tx,
            ctx: self.ctx.clone(),
            pool: self.store.pool().clone(),
        }))
    }

    /// The pool, for reads outside the transaction.
    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }
}

impl FromContext for Pg {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        let State(store) = State::<Postgres>::from_context(ctx)?;
        Ok(Self {
            store,
            ctx: ctx.clone(),
        })
    }

    fn check(states: &States) -> Result<(), MissingState> {
        State::<Postgres>::check(states)
    }
}

/// An open handler transaction (see [`Pg`]). Dropped without
/// [`commit`](Self::commit), it rolls back, inbox row included.
pub struct PgTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    ctx: Context,
    pool: PgPool,
}

impl PgTx {
    /// The connection to write through.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Stores what the handler emitted so far in the outbox and commits
    /// the transaction. Emit nothing after it: later emissions would be
    /// published without a row.
    ///
    /// # Errors
    /// An emission that cannot be built (permanent, as choreo would
    /// dead-letter it), or the database refused (retryable: nothing was
    /// committed).
    pub async fn commit(mut self) -> Result<(), HandlerError> {
        let emissions = self.ctx.emissions()?;
        if !emissions.is_empty() {
            let mut ids = Vec::with_capacity(emissions.len());
            let mut types = Vec::with_capacity(emissions.len());
            let mut subjects = Vec::with_capacity(emissions.len());
            let mut headers = Vec::with_capacity(emissions.len());
            let mut payloads = Vec::with_capacity(emissions.len());
            for e in &emissions {
                ids.push(e.event_id.to_string());
                types.push(e.event_type.to_owned());
                subjects.push(e.subject.clone());
                headers.push(headers_to_json(&e.headers));
                payloads.push(e.payload.to_vec());
            }
            // The rows' sequence numbers, to delete them by primary key
            // once published. Two rows with one id (a keyed event two
            // handlers emit) are both kept: the stream stores it once.
            let seqs: Vec<i64> = if let [one] = &emissions[..] {
                // The common case, one emission: plain parameters, which
                // Postgres runs faster than arrays.
                let seq = sqlx::query_scalar(
                    "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload)
                     VALUES ($1::uuid, $2, $3, $4::jsonb, $5)
                     RETURNING seq",
                )
                .bind(&ids[0])
                .bind(one.event_type)
                .bind(&one.subject)
                .bind(&headers[0])
                .bind(&payloads[0][..])
                .fetch_one(&mut *self.tx)
                .await
                .map_err(HandlerError::retryable)?;
                vec![seq]
            } else {
                sqlx::query_scalar(
                    "INSERT INTO choreo.outbox (event_id, event_type, subject, headers, payload)
                     SELECT id::uuid, ty, subject, headers::jsonb, payload
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[])
                          AS e(id, ty, subject, headers, payload)
                     RETURNING seq",
                )
                .bind(&ids)
                .bind(&types)
                .bind(&subjects)
                .bind(&headers)
                .bind(&payloads)
                .fetch_all(&mut *self.tx)
                .await
                .map_err(HandlerError::retryable)?
            };
            let pool = self.pool.clone();
            // Once choreo has published them, their rows go.
            self.ctx.after_emit(move || {
                Box::pin(async move {
                    let deleted = if let [seq] = &seqs[..] {
                        sqlx::query("DELETE FROM choreo.outbox WHERE seq = $1")
                            .bind(seq)
                            .execute(&pool)
                            .await
                    } else {
                        sqlx::query("DELETE FROM choreo.outbox WHERE seq = ANY($1)")
                            .bind(&seqs)
                            .execute(&pool)
                            .await
                    };
                    if let Err(e) = deleted {
                        tracing::warn!(error = %e, "cannot delete published outbox rows; the relay will publish them again (the stream drops the copies)");
                    }
                })
            });
        }
        self.tx.commit().await.map_err(HandlerError::retryable)
    }
}
