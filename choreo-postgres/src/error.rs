//! What can go wrong between choreo and Postgres.

/// A Postgres operation of choreo's failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// A statement failed.
    #[error("postgres: cannot {what}: {source}")]
    Sql {
        /// What choreo was doing.
        what: &'static str,
        /// What the database said.
        #[source]
        source: sqlx::Error,
    },
    /// Publishing an outbox row failed.
    #[error("postgres relay: cannot publish {0}")]
    Publish(String),
    /// The options cannot keep the guarantee.
    #[error("postgres: {0}")]
    Config(String),
    /// A read model did not apply an event in the time given
    /// ([`Postgres::wait_applied`](crate::Postgres::wait_applied)).
    #[error("postgres: {0}")]
    NotApplied(String),
    /// The schema is not one this code can use.
    #[error("postgres: {0}")]
    Schema(String),
}

impl PgError {
    /// Wraps an [`sqlx::Error`] with what choreo was doing.
    pub(crate) fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Sql { what, source }
    }
}
