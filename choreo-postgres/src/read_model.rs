//! Read models: tables a projection handler keeps, rebuilt by `choreo
//! replay --rerun` into a fresh generation while the old one serves reads.
//!
//! A read model's tables live in a schema of their own per generation,
//! `choreo_rm_<name>_<n>`, created by the model's DDL; readers query views
//! of the same names in [`ReadModel::views_in`] (default `public`), which
//! point at the live generation. `choreo.read_models` keeps, per model, the
//! live generation, the one being rebuilt, and the replay that started it.
//!
//! A delivery writes to the generation being rebuilt when there is one,
//! else to the live one (its transaction's `search_path` starts with that
//! generation's schema, so the handler's unqualified SQL lands there), and
//! claims the event in the inbox under a key of that generation, so the
//! rebuild runs every event again however often the live generation ran
//! it. A rerun replay's marker, seen by a delivery (read at most once a
//! second), starts the generation: the marker is written seconds before
//! the durable is rewound, so every event from the range's start on is
//! delivered after the generation exists. The relay swaps it in once the
//! handler's durable has acknowledged the whole range.

use std::time::Duration;

use choreo::admin;
use choreo::async_nats::jetstream;
use sqlx::{PgPool, Postgres, Row, Transaction};

/// A transaction, passed by value through the helpers below: their
/// futures are then Send for any caller (a `&mut PgConnection` argument
/// makes sqlx's executor bound unprovable inside a handler's future).
type Tx = Transaction<'static, Postgres>;

use crate::error::PgError;

/// A read model: a name, and the DDL that creates its tables (unqualified:
/// they are created in the generation's schema).
///
/// ```
/// use choreo_postgres::ReadModel;
///
/// static ORDERS: ReadModel = ReadModel::new(
///     "orders",
///     "CREATE TABLE order_view (order_id text PRIMARY KEY, status text NOT NULL)",
/// );
/// assert_eq!(ORDERS.name(), "orders");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ReadModel {
    name: &'static str,
    create: &'static str,
    views: &'static str,
}

impl ReadModel {
    /// A read model `name` (lower-case letters, digits and `_`, at most 40)
    /// whose tables `create` makes.
    pub const fn new(name: &'static str, create: &'static str) -> Self {
        Self {
            name,
            create,
            views: "public",
        }
    }

    /// The schema readers find its tables in, as views (default `public`).
    pub const fn views_in(self, schema: &'static str) -> Self {
        Self {
            views: schema,
            ..self
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn check(&self) -> Result<(), PgError> {
        for (what, id) in [("name", self.name), ("views schema", self.views)] {
            let ok = !id.is_empty()
                && id.len() <= 40
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !id.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(PgError::Config(format!(
                    "read model {what} {id:?}: use 1 to 40 lower-case letters, digits and _, not starting with a digit"
                )));
            }
        }
        Ok(())
    }
}

/// The schema of generation `generation` of read model `name`.
pub(crate) fn schema_of(name: &str, generation: i32) -> String {
    format!("choreo_rm_{name}_{generation}")
}

/// The inbox key of a handler writing generation `generation`: the handler
/// id for the first, so a handler that becomes a read model keeps its rows.
pub(crate) fn inbox_key(handler_id: &str, generation: i32) -> String {
    if generation == 1 {
        handler_id.to_owned()
    } else {
        format!("{handler_id}#{generation}")
    }
}

/// What a delivery must do before it can write.
pub(crate) enum Entry {
    /// Write to this generation (the search path is set).
    Write(i32),
    /// The model has no row yet, or a rerun replay wants a new generation:
    /// roll back, prepare it, and begin again.
    Prepare,
}

/// Reads the model's generations in `tx` and sets the transaction's search
/// path to the one this delivery writes to.
pub(crate) async fn enter(
    mut tx: Tx,
    rm: &ReadModel,
    marker: Option<&admin::Marker>,
) -> Result<(Tx, Entry), PgError> {
    rm.check()?;
    let row = sqlx::query(
        "SELECT coalesce(building, live) AS target, marker_ms,
                set_config('search_path',
                           format('%I, ', 'choreo_rm_' || name || '_' || coalesce(building, live))
                               || current_setting('search_path'),
                           true)
         FROM choreo.read_models WHERE name = $1",
    )
    .bind(rm.name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(PgError::sql("read the read model's generations"))?;
    let Some(row) = row else {
        return Ok((tx, Entry::Prepare));
    };
    let target: i32 = row
        .try_get("target")
        .map_err(PgError::sql("read the read model's generations"))?;
    let marker_ms: i64 = row
        .try_get("marker_ms")
        .map_err(PgError::sql("read the read model's generations"))?;
    if marker.is_some_and(|m| wants_rebuild(m, marker_ms)) {
        return Ok((tx, Entry::Prepare));
    }
    Ok((tx, Entry::Write(target)))
}

fn wants_rebuild(m: &admin::Marker, marker_ms: i64) -> bool {
    m.rerun && !m.ordered && i64::try_from(m.at_ms).unwrap_or(i64::MAX) > marker_ms
}

/// Creates the model's first generation if it has none, or the generation
/// a newer rerun replay asks for; instances that try at once take turns.
pub(crate) async fn prepare(
    pool: &PgPool,
    rm: &ReadModel,
    handler_id: &str,
    marker: Option<&admin::Marker>,
) -> Result<(), PgError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(PgError::sql("begin preparing a read model"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('choreo.read_model.' || $1))")
        .bind(rm.name)
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("lock the read model"))?;
    let row: Option<(i32, Option<i32>, i64)> = sqlx::query_as(
        "SELECT live, building, marker_ms FROM choreo.read_models WHERE name = $1 FOR UPDATE",
    )
    .bind(rm.name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(PgError::sql("read the read model's generations"))?;
    let marker_ms = marker.map_or(0, |m| i64::try_from(m.at_ms).unwrap_or(i64::MAX));
    match row {
        None => {
            // A new model: its first generation, live at once. A replay
            // made before it existed is not one to rebuild for.
            let first = schema_of(rm.name, 1);
            tx = create_generation(tx, rm, 1).await?;
            tx = point_views(tx, rm.views, None, &first).await?;
            let (service, handler) = handler_id.split_once('.').unwrap_or((handler_id, ""));
            sqlx::query(
                "INSERT INTO choreo.read_models (name, service, handler, views, live, marker_ms)
                 VALUES ($1, $2, $3, $4, 1, $5)",
            )
            .bind(rm.name)
            .bind(service)
            .bind(handler)
            .bind(rm.views)
            .bind(marker_ms)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("record the read model"))?;
            tracing::info!(
                read_model = rm.name,
                handler = handler_id,
                "read model created (generation 1)"
            );
        }
        Some((live, building, known_ms)) => {
            let Some(m) = marker.filter(|m| wants_rebuild(m, known_ms)) else {
                // Another instance prepared it meanwhile.
                return tx
                    .commit()
                    .await
                    .map_err(PgError::sql("commit the read model"));
            };
            // A newer rerun supersedes a rebuild that has not finished.
            if let Some(b) = building {
                let unfinished = schema_of(rm.name, b);
                tx = drop_schema(tx, &unfinished).await?;
            }
            let next = live.max(building.unwrap_or(0)) + 1;
            tx = create_generation(tx, rm, next).await?;
            sqlx::query(
                "UPDATE choreo.read_models SET building = $2, marker_ms = $3 WHERE name = $1",
            )
            .bind(rm.name)
            .bind(next)
            .bind(marker_ms)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("record the read model's new generation"))?;
            tracing::info!(
                read_model = rm.name,
                handler = handler_id,
                generation = next,
                live,
                replay_at_ms = m.at_ms,
                from = m.from,
                until = m.until,
                "read model rebuilding into a fresh generation for a rerun replay; the live one serves reads until it has caught up"
            );
        }
    }
    tx.commit()
        .await
        .map_err(PgError::sql("commit the read model"))
}

async fn create_generation(mut tx: Tx, rm: &ReadModel, generation: i32) -> Result<Tx, PgError> {
    let schema = schema_of(rm.name, generation);
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA \"{schema}\"; SET LOCAL search_path TO \"{schema}\", public"
    ))
    .execute(&mut *tx)
    .await
    .map_err(PgError::sql("create the read model's schema"))?;
    sqlx::raw_sql(rm.create)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            PgError::Config(format!(
                "read model {}: its DDL failed in schema {schema}: {e}",
                rm.name
            ))
        })?;
    sqlx::raw_sql("SET LOCAL search_path TO DEFAULT")
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("reset the search path"))?;
    Ok(tx)
}

/// Makes the views in `views` point at `to`'s tables (dropping those of
/// `from`'s), in one statement. The names are checked identifiers.
async fn point_views(mut tx: Tx, views: &str, from: Option<&str>, to: &str) -> Result<Tx, PgError> {
    let drop_old = from.map_or_else(String::new, |from| {
        format!(
            "FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{from}' LOOP
                 EXECUTE format('DROP VIEW IF EXISTS %I.%I', '{views}', t.tablename);
             END LOOP;"
        )
    });
    let sql = format!(
        "DO $$ DECLARE t record; BEGIN
             {drop_old}
             FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{to}' LOOP
                 EXECUTE format('CREATE VIEW %I.%I AS SELECT * FROM %I.%I',
                                '{views}', t.tablename, '{to}', t.tablename);
             END LOOP;
         END $$"
    );
    sqlx::query(&sql).persistent(false).execute(&mut *tx).await.map_err(|e| {
        PgError::Config(format!(
            "cannot point the views in {views} at the read model's tables in {to} (is there a table, not a view, of one of their names in {views}?): {e}"
        ))
    })?;
    Ok(tx)
}

async fn drop_schema(mut tx: Tx, schema: &str) -> Result<Tx, PgError> {
    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    sqlx::query(&sql)
        .persistent(false)
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("drop a read model's generation"))?;
    Ok(tx)
}

/// Swaps in every generation whose rebuild has caught up: the handler was
/// rewound and its durable acknowledged the replay's whole range. Returns
/// how many.
pub(crate) async fn swap_caught_up(pool: &PgPool, js: &jetstream::Context) -> Result<u64, PgError> {
    let building: Vec<(String, String, String, i32, i64)> = sqlx::query_as(
        "SELECT name, service, handler, building, marker_ms
         FROM choreo.read_models WHERE building IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .map_err(PgError::sql("read the read models"))?;
    let mut swapped = 0;
    for (name, service, handler, generation, marker_ms) in building {
        let Ok(Some(m)) = admin::marker(js, &service, &handler).await else {
            continue;
        };
        if i64::try_from(m.at_ms).unwrap_or(i64::MAX) != marker_ms {
            continue;
        }
        match admin::replay_done(js, &service, &handler, &m).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(read_model = %name, handler = %format!("{service}.{handler}"), error = %e, "cannot tell whether the read model's rebuild has caught up; trying again");
                continue;
            }
        }
        if swap(pool, &name, generation).await? {
            swapped += 1;
        }
    }
    Ok(swapped)
}

/// Makes `generation` the live one: the views point at it, the old
/// generation is dropped. `false` if another instance did it first.
async fn swap(pool: &PgPool, name: &str, generation: i32) -> Result<bool, PgError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(PgError::sql("begin a read model's swap"))?;
    let row: Option<(i32, Option<i32>, String)> = sqlx::query_as(
        "SELECT live, building, views FROM choreo.read_models WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await
    .map_err(PgError::sql("read the read model's generations"))?;
    let Some((live, Some(building), views)) = row else {
        return Ok(false);
    };
    if building != generation {
        return Ok(false);
    }
    let old = schema_of(name, live);
    let new = schema_of(name, building);
    tx = point_views(tx, &views, Some(&old), &new).await?;
    tx = drop_schema(tx, &old).await?;
    sqlx::query(
        "UPDATE choreo.read_models SET live = building, building = NULL, swapped_at = now()
         WHERE name = $1",
    )
    .bind(name)
    .execute(&mut *tx)
    .await
    .map_err(PgError::sql("record the read model's swap"))?;
    tx.commit()
        .await
        .map_err(PgError::sql("commit the read model's swap"))?;
    tracing::info!(
        read_model = name,
        generation = building,
        old = live,
        "read model rebuilt: the fresh generation is live, the old one dropped"
    );
    Ok(true)
}

/// Whether the live generation of `rm` has applied event `event_id`.
pub(crate) async fn applied(
    pool: &PgPool,
    rm: &ReadModel,
    event_id: choreo::EventId,
) -> Result<bool, PgError> {
    rm.check()?;
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM choreo.read_models r
             JOIN choreo.inbox i
               ON i.handler = CASE WHEN r.live = 1 THEN r.service || '.' || r.handler
                                   ELSE r.service || '.' || r.handler || '#' || r.live END
              AND i.event_id = $2::uuid
             WHERE r.name = $1)",
    )
    .bind(rm.name)
    .bind(event_id.to_string())
    .fetch_one(pool)
    .await
    .map_err(PgError::sql("read the read model's inbox"))
}

/// Waits until [`applied`], polling with a backoff from 1 ms to 50 ms.
pub(crate) async fn wait_applied(
    pool: &PgPool,
    rm: &ReadModel,
    event_id: choreo::EventId,
    within: Duration,
) -> Result<(), PgError> {
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if applied(pool, rm, event_id).await? {
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= within {
            return Err(PgError::NotApplied(format!(
                "read model {} has not applied event {event_id} within {within:?}: its handler lags or stopped (see `choreo status`)",
                rm.name
            )));
        }
        tokio::time::sleep(pause.min(within - waited)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
