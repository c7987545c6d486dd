//! The tables choreo keeps in the user's database, created by versioned
//! migrations that ship with the crate.

use sqlx::PgPool;

use crate::error::PgError;

/// The schema version [`migrate`] brings a database to.
pub const SCHEMA_VERSION: i32 = 2;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[
    // 1: the inbox (one row per handled event and handler, the unique key
    // that decides which instance commits) and the outbox (emissions
    // committed with the handler's effects, until they are published).
    r"
    CREATE TABLE choreo.inbox (
        handler    text        NOT NULL,
        event_id   uuid        NOT NULL,
        handled_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (handler, event_id)
    );
    -- Rows come in time order: a BRIN index finds the old ones for the
    -- prune at a fraction of a B-tree's cost on every insert.
    CREATE INDEX inbox_handled_at ON choreo.inbox USING brin (handled_at);
    CREATE TABLE choreo.outbox (
        seq        bigserial   PRIMARY KEY,
        event_id   uuid        NOT NULL,
        event_type text        NOT NULL,
        subject    text        NOT NULL,
        headers    jsonb       NOT NULL,
        payload    bytea       NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    -- The primary key is the only index: rows live milliseconds, they are
    -- deleted by it, and the relay reads the oldest first along it.
    ",
    // 2: read models: per model, the live generation (the one its views
    // show), the one being rebuilt, and the replay that started it; and
    // outbox rows whose publish failed, kept with the reason and retried
    // later rather than blocking the rows behind them.
    // The headers become text: a row lives milliseconds, and parsing JSON
    // into jsonb on every insert cost more than it ever gave back.
    r"
    ALTER TABLE choreo.outbox
        ALTER COLUMN headers TYPE text,
        ADD COLUMN attempts   int NOT NULL DEFAULT 0,
        ADD COLUMN last_error text,
        ADD COLUMN retry_at   timestamptz,
        ADD COLUMN okey       text;
    -- An entry point's events staged in key order (Outbox::stage_in_order):
    -- the relay publishes only the oldest row of a key.
    CREATE INDEX outbox_okey ON choreo.outbox (okey, seq) WHERE okey IS NOT NULL;
    -- Rows live milliseconds: vacuum the dead ones after every thousand,
    -- not after a fifth of the table, so it stays a few pages.
    ALTER TABLE choreo.outbox SET (autovacuum_vacuum_scale_factor = 0,
                                   autovacuum_vacuum_threshold = 1000,
                                   autovacuum_vacuum_insert_scale_factor = 0,
                                   autovacuum_vacuum_insert_threshold = 1000);
    CREATE TABLE choreo.read_models (
        name       text        PRIMARY KEY,
        views      text        NOT NULL,
        live       int         NOT NULL,
        building   int,
        started_ms bigint      NOT NULL DEFAULT 0,
        swapped_at timestamptz
    );
    -- The handlers that keep a model, and the rerun replay each last took
    -- into account: a rebuild is swapped in once every one has joined it.
    CREATE TABLE choreo.read_model_handlers (
        name      text   NOT NULL REFERENCES choreo.read_models (name),
        service   text   NOT NULL,
        handler   text   NOT NULL,
        joined_ms bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (name, service, handler)
    );
    ",
];

/// A key for `pg_advisory_xact_lock`: instances that start together
/// migrate one after the other.
const LOCK: i64 = 0x6368_6f72_656f_0001;

/// Brings the `choreo` schema to [`SCHEMA_VERSION`], each step in one
/// transaction, the version recorded in `choreo.schema_version`. Safe to
/// call from every instance at start-up: they take turns, and a database
/// already at the version is left alone.
///
/// # Errors
/// The database refused (rights, connection), or it is at a newer version
/// than this code knows (a downgrade).
pub async fn migrate(pool: &PgPool) -> Result<i32, PgError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(PgError::sql("begin the migration"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK)
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("lock the migration"))?;
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS choreo;
         CREATE TABLE IF NOT EXISTS choreo.schema_version (version int NOT NULL)",
    )
    .execute(&mut *tx)
    .await
    .map_err(PgError::sql("create the choreo schema"))?;
    let version: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM choreo.schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(PgError::sql("read the schema version"))?;
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(PgError::Schema(format!(
            "the database's choreo schema is at version {version}, newer than this code's {SCHEMA_VERSION}: run the newer code, or restore the schema"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let to = i as i32 + 1;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("apply a migration"))?;
        sqlx::query("INSERT INTO choreo.schema_version (version) VALUES ($1)")
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("record the schema version"))?;
        tracing::info!(version = to, "choreo schema migrated");
    }
    tx.commit()
        .await
        .map_err(PgError::sql("commit the migration"))?;
    Ok(SCHEMA_VERSION)
}
