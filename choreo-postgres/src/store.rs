//! [`Postgres`]: a service's database for Postgres handlers, with the relay
//! that publishes what a process committed but did not get to publish.

use std::sync::{Arc, Weak};
use std::time::Duration;

use choreo::Publisher;
use choreo::async_nats::jetstream;
use sqlx::PgPool;

use crate::error::PgError;
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
}

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
        let inner = Arc::new(Inner {
            pool,
            js: publisher.js().clone(),
            options,
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
}

/// The relay's view of the store: gone once every [`Postgres`] is dropped.
pub(crate) type RelayHandle = Weak<Inner>;
