//! [`Postgres`]: a service's database for Postgres handlers, with the relay
//! that publishes what a process committed but did not get to publish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use choreo::async_nats::jetstream;
use choreo::{EventId, Publisher, admin};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::PgError;
use crate::read_model::{self, ReadModel};
use crate::relay;

/// How long an outbox row waits before the relay publishes it: the
/// handler's own publish normally deletes it within milliseconds, so a row
/// this old was left by a process that died after its commit.
pub const DEFAULT_RELAY_DELAY: Duration = Duration::from_secs(5);

/// How often the relay looks for such rows.
pub const DEFAULT_RELAY_EVERY: Duration = Duration::from_secs(1);

/// How [`Postgres`] runs its relay and keeps its inbox.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// How old an outbox row must be before the relay publishes it
    /// (default [`DEFAULT_RELAY_DELAY`]). It must stay below the streams'
    /// duplicate window, or a row published by both the handler and the
    /// relay could be stored twice.
    pub relay_delay: Duration,
    /// How often the relay looks (default [`DEFAULT_RELAY_EVERY`]).
    pub relay_every: Duration,
    /// How long inbox rows are kept (default
    /// [`choreo::DEFAULT_INBOX_RETENTION`]): at least as long as the
    /// handled events' streams keep events, so a replay cannot apply an
    /// effect twice.
    pub inbox_retention: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            relay_delay: DEFAULT_RELAY_DELAY,
            relay_every: DEFAULT_RELAY_EVERY,
            inbox_retention: choreo::DEFAULT_INBOX_RETENTION,
        }
    }
}

impl PostgresOptions {
    /// Sets [`relay_delay`](Self::relay_delay).
    pub fn relay_delay(mut self, d: Duration) -> Self {
        self.relay_delay = d;
        self
    }

    /// Sets [`relay_every`](Self::relay_every).
    pub fn relay_every(mut self, d: Duration) -> Self {
        self.relay_every = d;
        self
    }

    /// Sets [`inbox_retention`](Self::inbox_retention).
    pub fn inbox_retention(mut self, d: Duration) -> Self {
        self.inbox_retention = d;
        self
    }
}

/// A service's Postgres for its Postgres handlers: register it with
/// `Service::state(postgres)` and take a [`Pg`](crate::Pg) in a handler.
/// Starting it migrates the `choreo` schema and starts the relay, which
/// runs until the last clone is dropped.
#[derive(Clone)]
pub struct Postgres {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) js: jetstream::Context,
    pub(crate) options: PostgresOptions,
    /// The service (the publisher's source), for its outbox report.
    pub(crate) service: String,
    /// The replicas of the registry bucket, if the report creates it.
    pub(crate) replicas: usize,
    /// The instance, for its outbox report: host and process id.
    pub(crate) instance: String,
    /// The replay markers of read models' handlers, by `service.handler`,
    /// with when each was read.
    markers: Mutex<HashMap<String, (Instant, Option<admin::Marker>)>>,
    /// Published outbox rows to delete, in batches, off the request's and
    /// the handler's path.
    published: tokio::sync::mpsc::UnboundedSender<Vec<i64>>,
}

/// How long a replay marker read for a read model is trusted: `choreo
/// replay` writes it seconds before it rewinds the durable.
const MARKER_FRESH: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// Migrates the schema and starts the relay, with the default
    /// options; the relay publishes through `publisher`'s connection.
    ///
    /// # Errors
    /// The migration failed, or the relay would publish later than
    /// `publisher`'s streams' duplicate window allows
    /// ([`PgError::Config`]).
    pub async fn start(pool: PgPool, publisher: &Publisher) -> Result<Self, PgError> {
        Self::start_with(pool, publisher, PostgresOptions::default()).await
    }

    /// [`start`](Self::start) with `options`.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_with(
        pool: PgPool,
        publisher: &Publisher,
        options: PostgresOptions,
    ) -> Result<Self, PgError> {
        // A row the handler published just before dying, published again
        // by the relay after the stream forgot its id, would be stored
        // twice: the relay must come well inside the duplicate window.
        let window = publisher.settings().duplicate_window;
        let latest = options.relay_delay + options.relay_every * 2;
        if latest >= window {
            return Err(PgError::Config(format!(
                "the relay publishes a row up to {latest:?} after its commit (relay_delay {:?} + twice relay_every {:?}), not inside the streams' duplicate window of {window:?}: a row both the handler and the relay publish could be stored twice; shorten the relay delay or widen the window (StreamSettings::duplicate_window)",
                options.relay_delay, options.relay_every
            )));
        }
        crate::schema::migrate(&pool).await?;
        crate::relay::describe_metrics();
        let (published, to_delete) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(delete_published(pool.clone(), to_delete));
        let inner = Arc::new(Inner {
            pool,
            js: publisher.js().clone(),
            options,
            service: publisher.source().to_owned(),
            replicas: publisher.settings().replicas,
            instance: format!("{}:{}", choreo::registry::host_name(), std::process::id()),
            markers: Mutex::default(),
            published,
        });
        tokio::spawn(relay::run(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The options it runs with.
    pub fn options(&self) -> PostgresOptions {
        self.inner.options
    }

    /// Whether the live generation of read model `rm` has applied the
    /// event `event_id` (its handler committed it): one indexed lookup.
    ///
    /// # Errors
    /// The database refused.
    pub async fn applied(&self, rm: &ReadModel, event_id: EventId) -> Result<bool, PgError> {
        read_model::applied(self.pool(), rm, event_id).await
    }

    /// Waits until read model `rm` has applied the event `event_id`, so a
    /// request that just published it can read its own write: polls
    /// [`applied`](Self::applied) from every millisecond up to every 50 ms.
    /// While the model is rebuilt it waits for the rebuilt generation to go
    /// live, so what it then reads has the event.
    ///
    /// ```no_run
    /// # async fn demo(postgres: choreo_postgres::Postgres, publisher: choreo::Publisher,
    /// #     event: impl choreo::Event) -> Result<(), Box<dyn std::error::Error>> {
    /// # static ORDERS: choreo_postgres::ReadModel = choreo_postgres::ReadModel::new("orders", "");
    /// use std::time::Duration;
    /// let receipt = publisher.publish(&event).await?;
    /// postgres.wait_applied(&ORDERS, receipt.event_id, Duration::from_secs(2)).await?;
    /// // A read of the order view now sees the event.
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`PgError::NotApplied`] after `within`; the database refused.
    pub async fn wait_applied(
        &self,
        rm: &ReadModel,
        event_id: EventId,
        within: Duration,
    ) -> Result<(), PgError> {
        read_model::wait_applied(self.pool(), rm, event_id, within).await
    }

    /// Deletes the outbox rows `seqs`, which are published: in the
    /// background, batched with other deletes (a row whose delete is lost
    /// to a crash is published again by the relay, and the stream drops
    /// the copy).
    pub(crate) fn forget_published(&self, seqs: Vec<i64>) {
        let _ = self.inner.published.send(seqs);
    }

    /// The last replay marker of `service`'s `handler`, read at most once
    /// a second; `None` when there is none or it cannot be read now.
    pub(crate) async fn marker(&self, service: &str, handler: &str) -> Option<admin::Marker> {
        let key = format!("{service}.{handler}");
        if let Some((at, m)) = self.lock_markers().get(&key)
            && at.elapsed() < MARKER_FRESH
        {
            return m.clone();
        }
        let m = match admin::marker(&self.inner.js, service, handler).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(handler = %key, error = %e, "cannot read the handler's replay marker; a rerun replay will start its read model's rebuild once it can");
                return self.lock_markers().get(&key).and_then(|(_, m)| m.clone());
            }
        };
        self.lock_markers().insert(key, (Instant::now(), m.clone()));
        m
    }

    fn lock_markers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<admin::Marker>)>> {
        self.inner
            .markers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The relay's view of the store: gone once every [`Postgres`] is dropped.
pub(crate) type RelayHandle = Weak<Inner>;

/// The most rows one delete removes.
const DELETE_BATCH: usize = 4096;

/// How long the first published row of a delete waits for others to join
/// it. A delete is a statement, a transaction and a round trip, whatever
/// its size; gathering a moment's rows makes it one per many requests
/// rather than one per few, and a row a moment older costs nothing (the
/// relay leaves rows younger than its delay, seconds, alone).
const DELETE_LINGER: Duration = Duration::from_millis(10);

/// Deletes published outbox rows as they come, those of up to
/// [`DELETE_LINGER`] per statement, until the store is dropped. It keeps a
/// connection of its own (opened with the pool's options) rather than
/// taking one from the pool: a pool checks a connection with a round trip
/// when it is taken and again when it is given back, which would triple
/// the cost of each delete and take a connection from the requests.
async fn delete_published(pool: PgPool, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<i64>>) {
    let mut conn: Option<PgConnection> = None;
    while let Some(mut batch) = rx.recv().await {
        let until = tokio::time::Instant::now() + DELETE_LINGER;
        while batch.len() < DELETE_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(more)) => batch.extend(more),
                // Closed (the store is gone: delete these, then end) or
                // the moment is over.
                Ok(None) | Err(_) => break,
            }
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match PgConnection::connect_with(&pool.connect_options()).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(rows = batch.len(), error = %e, "cannot connect to delete published outbox rows; the relay will publish them again (the stream drops the copies)");
                    continue;
                }
            },
        };
        let deleted = sqlx::query("DELETE FROM choreo.outbox WHERE seq = ANY($1)")
            .bind(&batch)
            .execute(&mut *c)
            .await;
        if let Err(e) = deleted {
            // A connection that failed is opened afresh for the next batch.
            conn = None;
            tracing::warn!(rows = batch.len(), error = %e, "cannot delete published outbox rows; the relay will publish them again (the stream drops the copies)");
        }
    }
}
