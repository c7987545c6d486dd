//! [`Pg`]: a handler's transaction in the service's Postgres, with the
//! event claimed in the inbox and the emissions stored in the outbox of the
//! same transaction.

use choreo::{Context, FromContext, HandlerError, MissingState, State, States};
use sqlx::{PgConnection, PgPool};

use crate::error::PgError;
use crate::read_model::{self, Entry};
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
        let tx = self
            .store
            .pool()
            .begin()
            .await
            .map_err(HandlerError::retryable)?;
        let (tx, claimed) = self.claim(tx, self.ctx.handler_id()).await?;
        Ok(claimed.then(|| self.open(tx)))
    }

    /// [`begin`](Self::begin) for a handler that keeps read model `rm`:
    /// the transaction's `search_path` starts with the schema of the
    /// model's generation this delivery writes to, so the handler's
    /// unqualified SQL on the model's tables lands there, and the event is
    /// claimed for that generation. While `choreo replay --rerun` rebuilds
    /// the model, that is the fresh generation, which runs every event
    /// again (see [`ReadModel`](crate::ReadModel)).
    ///
    /// # Errors
    /// The database refused (retryable), or the model's name or DDL is
    /// unusable (permanent: the event is dead-lettered with the reason).
    pub async fn begin_read_model(
        &self,
        rm: &crate::ReadModel,
    ) -> Result<Option<PgTx>, HandlerError> {
        let marker = self
            .store
            .marker(self.ctx.service(), self.ctx.handler())
            .await;
        for _ in 0..3 {
            let tx = self
                .store
                .pool()
                .begin()
                .await
                .map_err(HandlerError::retryable)?;
            let (tx, entry) = read_model::enter(tx, rm, self.ctx.handler_id(), marker.as_ref())
                .await
                .map_err(into_handler_error)?;
            match entry {
                Entry::Write(generation) => {
                    let key = read_model::inbox_key(self.ctx.handler_id(), generation);
                    let (tx, claimed) = self.claim(tx, &key).await?;
                    return Ok(claimed.then(|| self.open(tx)));
                }
                Entry::Prepare(_) => {
                    drop(tx);
                    // The model's DDL runs through `raw_sql` (several
                    // statements), whose future sqlx cannot prove Send
                    // inside a handler's: it runs on a blocking thread of
                    // its own. This happens once per model and rebuild.
                    let (pool, rm, handler_id, marker) = (
                        self.store.pool().clone(),
                        *rm,
                        self.ctx.handler_id().to_owned(),
                        marker.clone(),
                    );
                    let runtime = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || {
                        runtime.block_on(read_model::prepare(
                            &pool,
                            &rm,
                            &handler_id,
                            marker.as_ref(),
                        ))
                    })
                    .await
                    .map_err(HandlerError::retryable)?
                    .map_err(into_handler_error)?;
                }
            }
        }
        Err(HandlerError::retryable(format!(
            "read model {}: its generations changed three times while this event began; trying again",
            rm.name()
        )))
    }

    /// Inserts the inbox row `(key, event id)`; `false` when it exists (a
    /// copy of an event committed before).
    async fn claim(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &str,
    ) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, bool), HandlerError> {
        let claimed = sqlx::query(
            "INSERT INTO choreo.inbox (handler, event_id) VALUES ($1, $2::uuid)
             ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(self.ctx.event_id().to_string())
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::retryable)?
        .rows_affected();
        if claimed == 0 {
            tracing::info!(
                event_id = %self.ctx.event_id(),
                handler = self.ctx.handler_id(),
                inbox_key = key,
                "already committed for this event (postgres inbox); skipped"
            );
        }
        Ok((tx, claimed > 0))
    }

    fn open(&self, tx: sqlx::Transaction<'static, sqlx::Postgres>) -> PgTx {
        PgTx {
            tx,
            ctx: self.ctx.clone(),
            store: self.store.clone(),
        }
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
    store: Postgres,
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
                     VALUES ($1::uuid, $2, $3, $4, $5)
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
                     SELECT id::uuid, ty, subject, headers, payload
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
            let store = self.store.clone();
            // Once choreo has published them, their rows go.
            self.ctx.after_emit(move || {
                store.forget_published(seqs);
                Box::pin(std::future::ready(()))
            });
        }
        self.tx.commit().await.map_err(HandlerError::retryable)
    }
}

/// A read model's error as the handler's: a database that refused is
/// retried, a model that cannot work is dead-lettered with the reason.
fn into_handler_error(e: PgError) -> HandlerError {
    match e {
        PgError::Config(_) | PgError::Schema(_) => HandlerError::permanent(e.to_string()),
        other => HandlerError::retryable(other),
    }
}
