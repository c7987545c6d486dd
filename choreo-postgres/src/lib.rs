//! Postgres handlers for choreo: a handler's effects, its inbox row and its
//! emissions committed in one transaction of the service's own database.
//!
//! - [`Postgres`] is the service's database: starting it migrates the
//!   `choreo` schema ([`schema::migrate`], versioned) and starts the relay.
//! - [`Pg`] is the handler argument: [`Pg::begin`] opens the transaction
//!   with the event claimed in the `choreo.inbox` table, [`PgTx::commit`]
//!   stores the emissions in `choreo.outbox` and commits; choreo publishes
//!   them (their ids are deterministic, so a second publish is a duplicate
//!   the stream drops), deletes their rows and acknowledges the event.
//! - The relay, in every instance, publishes outbox rows older than
//!   [`PostgresOptions::relay_delay`] (a process died between its commit
//!   and its publish) with `FOR UPDATE SKIP LOCKED`, and prunes inbox rows
//!   past their retention in bounded batches.
//!
//! - An [`Outbox`] publishes from an entry point (a web request) without a
//!   dual write: [`Outbox::stage`] writes the event into the caller's own
//!   transaction, [`Outbox::commit`] commits it and publishes at once; the
//!   relay publishes what a dead process left.
//! - A [`ReadModel`] is a set of tables a projection handler keeps
//!   ([`Pg::begin_read_model`]); `choreo replay --rerun` rebuilds it into a
//!   fresh generation while the old one serves reads, and
//!   [`Postgres::wait_applied`] lets a request read its own writes.
//!
//! See `docs/postgres.md`.

mod error;
mod outbox;
mod read_model;
mod relay;
pub mod schema;
mod store;
mod tx;

pub use error::PgError;
pub use outbox::{Committed, Outbox, Staged};
pub use read_model::ReadModel;
pub use schema::{SCHEMA_VERSION, migrate};
pub use store::{DEFAULT_RELAY_DELAY, DEFAULT_RELAY_EVERY, Postgres, PostgresOptions};
pub use tx::{Pg, PgTx};

/// The `sqlx` this crate is built on, re-exported so users share its
/// version.
pub use sqlx;
