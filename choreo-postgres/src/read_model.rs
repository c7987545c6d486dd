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

/// What one handler of a model sees of it: the model's generations and
/// the rerun it last took part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    live: i32,
    building: Option<i32>,
    /// The replay (its marker's `at_ms`) that started the newest
    /// generation.
    started_ms: i64,
    /// The replay of this handler that it last took into account; `None`:
    /// the handler is not registered with the model yet.
    joined_ms: Option<i64>,
}

impl Seen {
    /// The generation the handler writes to: the one being rebuilt once
    /// it has joined the rebuild (its rerun replay came after the rebuild
    /// started), else the live one.
    fn target(&self) -> i32 {
        match (self.building, self.joined_ms) {
            (Some(b), Some(j)) if j >= self.started_ms => b,
            _ => self.live,
        }
    }
}

/// What a delivery must do before it can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Write to this generation (the search path is set).
    Write(i32),
    /// Roll back, [`prepare`] the model, and begin again.
    Prepare(Step),
}

/// A change to a model's generations, made by [`prepare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The model is new: its first generation, live at once.
    Create,
    /// The handler is new to the model.
    Register,
    /// The handler takes part in the rebuild its rerun replay belongs to
    /// (or notes a replay that predates it).
    Join(i64),
    /// A rerun replay newer than the model's rebuilds: a fresh generation
    /// (a rebuild not finished is dropped for it).
    Start(i64),
}

/// What a handler does with a model in `seen` state, given its last replay
/// `marker`: write to a generation, or change the model first.
pub(crate) fn decide(seen: Option<&Seen>, marker: Option<&admin::Marker>) -> Entry {
    let Some(seen) = seen else {
        return Entry::Prepare(Step::Create);
    };
    let Some(joined) = seen.joined_ms else {
        return Entry::Prepare(Step::Register);
    };
    let rerun_ms = marker
        .filter(|m| m.rerun && !m.ordered)
        .map(|m| i64::try_from(m.at_ms).unwrap_or(i64::MAX));
    match rerun_ms {
        Some(at) if at > joined => {
            let in_this_build = seen.building.is_some() && joined >= seen.started_ms;
            if at > seen.started_ms && (seen.building.is_none() || in_this_build) {
                Entry::Prepare(Step::Start(at))
            } else {
                Entry::Prepare(Step::Join(at))
            }
        }
        _ => Entry::Write(seen.target()),
    }
}

/// Reads the model's generations in `tx`, and sets the transaction's
/// search path to the generation this handler writes to.
pub(crate) async fn enter(
    tx: Tx,
    rm: &ReadModel,
    handler_id: &str,
    marker: Option<&admin::Marker>,
) -> Result<(Tx, Entry), PgError> {
    rm.check()?;
    // The state, and the search path set to the generation it writes to.
    let (tx, seen) = read_seen(tx, rm, handler_id).await?;
    let entry = decide(seen.as_ref(), marker);
    Ok((tx, entry))
}

/// Reads what the handler sees of the model (its row joined with the
/// handler's), and sets the transaction's search path to the generation
/// the handler writes to (harmless in [`prepare`], whose DDL sets its own).
async fn read_seen(
    mut tx: Tx,
    rm: &ReadModel,
    handler_id: &str,
) -> Result<(Tx, Option<Seen>), PgError> {
    let (service, handler) = split(handler_id);
    let row = sqlx::query(
        "SELECT r.live, r.building, r.started_ms, h.joined_ms,
                set_config('search_path',
                           format('%I, ', 'choreo_rm_' || r.name || '_' ||
                               CASE WHEN r.building IS NOT NULL AND h.joined_ms >= r.started_ms
                                    THEN r.building ELSE r.live END)
                               || current_setting('search_path'),
                           true)
         FROM choreo.read_models r
         LEFT JOIN choreo.read_model_handlers h
                ON h.name = r.name AND h.service = $2 AND h.handler = $3
         WHERE r.name = $1",
    )
    .bind(rm.name)
    .bind(service)
    .bind(handler)
    .fetch_optional(&mut *tx)
    .await
    .map_err(PgError::sql("read the read model's generations"))?;
    let seen = row.map(|r| seen_of(&r)).transpose()?;
    Ok((tx, seen))
}

fn seen_of(row: &sqlx::postgres::PgRow) -> Result<Seen, PgError> {
    let read = PgError::sql("read the read model's generations");
    Ok(Seen {
        live: row.try_get("live").map_err(read)?,
        building: row
            .try_get("building")
            .map_err(PgError::sql("read the read model's generations"))?,
        started_ms: row
            .try_get("started_ms")
            .map_err(PgError::sql("read the read model's generations"))?,
        joined_ms: row
            .try_get("joined_ms")
            .map_err(PgError::sql("read the read model's generations"))?,
    })
}

/// `service.handler` as its two parts.
fn split(handler_id: &str) -> (&str, &str) {
    handler_id.split_once('.').unwrap_or((handler_id, ""))
}

/// Makes the change [`enter`] asked for, if it is still wanted once the
/// model is locked (another instance may have made it).
pub(crate) async fn prepare(
    pool: &PgPool,
    rm: &ReadModel,
    handler_id: &str,
    marker: Option<&admin::Marker>,
) -> Result<(), PgError> {
    let (service, handler) = split(handler_id);
    let mut tx = pool
        .begin()
        .await
        .map_err(PgError::sql("begin preparing a read model"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('choreo.read_model.' || $1))")
        .bind(rm.name)
        .execute(&mut *tx)
        .await
        .map_err(PgError::sql("lock the read model"))?;
    let (mut tx, seen) = read_seen(tx, rm, handler_id).await?;
    // A replay made before the handler met the model is not one to
    // rebuild for.
    let seen_ms = marker.map_or(0, |m| i64::try_from(m.at_ms).unwrap_or(i64::MAX));
    let Entry::Prepare(step) = decide(seen.as_ref(), marker) else {
        return tx
            .commit()
            .await
            .map_err(PgError::sql("commit the read model"));
    };
    match step {
        Step::Create => {
            let first = schema_of(rm.name, 1);
            tx = create_generation(tx, rm, 1).await?;
            tx = point_views(tx, rm.views, None, &first).await?;
            sqlx::query(
                "INSERT INTO choreo.read_models (name, views, live, started_ms)
                 VALUES ($1, $2, 1, 0)",
            )
            .bind(rm.name)
            .bind(rm.views)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("record the read model"))?;
            tx = register(tx, rm, service, handler, seen_ms).await?;
            tracing::info!(
                read_model = rm.name,
                handler = handler_id,
                "read model created (generation 1)"
            );
        }
        Step::Register => {
            tx = register(tx, rm, service, handler, seen_ms).await?;
        }
        Step::Join(at) => {
            tx = joined(tx, rm, service, handler, at).await?;
            tracing::info!(
                read_model = rm.name,
                handler = handler_id,
                replay_at_ms = at,
                "read model: the handler's rerun replay joins the rebuild"
            );
        }
        Step::Start(at) => {
            let Some(seen) = seen else {
                return Err(PgError::Schema(format!(
                    "read model {} vanished while it was being prepared",
                    rm.name
                )));
            };
            // A newer rerun supersedes a rebuild that has not finished.
            if let Some(b) = seen.building {
                let unfinished = schema_of(rm.name, b);
                tx = drop_schema(tx, &unfinished).await?;
            }
            let next = seen.live.max(seen.building.unwrap_or(0)) + 1;
            tx = create_generation(tx, rm, next).await?;
            sqlx::query(
                "UPDATE choreo.read_models SET building = $2, started_ms = $3 WHERE name = $1",
            )
            .bind(rm.name)
            .bind(next)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(PgError::sql("record the read model's new generation"))?;
            tx = joined(tx, rm, service, handler, at).await?;
            tracing::info!(
                read_model = rm.name,
                handler = handler_id,
                generation = next,
                live = seen.live,
                replay_at_ms = at,
                "read model rebuilding into a fresh generation for a rerun replay; the live one serves reads until every handler of the model has been replayed and caught up"
            );
        }
    }
    tx.commit()
        .await
        .map_err(PgError::sql("commit the read model"))
}

async fn register(
    mut tx: Tx,
    rm: &ReadModel,
    service: &str,
    handler: &str,
    joined_ms: i64,
) -> Result<Tx, PgError> {
    sqlx::query(
        "INSERT INTO choreo.read_model_handlers (name, service, handler, joined_ms)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(rm.name)
    .bind(service)
    .bind(handler)
    .bind(joined_ms)
    .execute(&mut *tx)
    .await
    .map_err(PgError::sql("register the read model's handler"))?;
    Ok(tx)
}

async fn joined(
    mut tx: Tx,
    rm: &ReadModel,
    service: &str,
    handler: &str,
    at: i64,
) -> Result<Tx, PgError> {
    sqlx::query(
        "UPDATE choreo.read_model_handlers SET joined_ms = $4
         WHERE name = $1 AND service = $2 AND handler = $3",
    )
    .bind(rm.name)
    .bind(service)
    .bind(handler)
    .bind(at)
    .execute(&mut *tx)
    .await
    .map_err(PgError::sql("record the handler's rerun"))?;
    Ok(tx)
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

/// Swaps in every generation whose rebuild has caught up: every handler
/// of the model joined it with a rerun replay, and each one's durable has
/// acknowledged its replay's whole range. Returns how many.
pub(crate) async fn swap_caught_up(pool: &PgPool, js: &jetstream::Context) -> Result<u64, PgError> {
    let building: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT name, building, started_ms FROM choreo.read_models WHERE building IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .map_err(PgError::sql("read the read models"))?;
    let mut swapped = 0;
    'models: for (name, generation, started_ms) in building {
        let handlers: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT service, handler, joined_ms FROM choreo.read_model_handlers WHERE name = $1",
        )
        .bind(&name)
        .fetch_all(pool)
        .await
        .map_err(PgError::sql("read the read model's handlers"))?;
        for (service, handler, joined_ms) in &handlers {
            // A handler not yet replayed holds the swap back.
            if *joined_ms < started_ms {
                continue 'models;
            }
            let Ok(Some(m)) = admin::marker(js, service, handler).await else {
                continue 'models;
            };
            if i64::try_from(m.at_ms).unwrap_or(i64::MAX) != *joined_ms {
                continue 'models;
            }
            match admin::replay_done(js, service, handler, &m).await {
                Ok(true) => {}
                Ok(false) => continue 'models,
                Err(e) => {
                    tracing::warn!(read_model = %name, handler = %format!("{service}.{handler}"), error = %e, "cannot tell whether the read model's rebuild has caught up; trying again");
                    continue 'models;
                }
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
             JOIN choreo.read_model_handlers h ON h.name = r.name
             JOIN choreo.inbox i
               ON i.handler = CASE WHEN r.live = 1 THEN h.service || '.' || h.handler
                                   ELSE h.service || '.' || h.handler || '#' || r.live END
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

#[cfg(test)]
mod tests {
    use choreo::admin::Marker;

    use super::{Entry, Seen, Step, decide};

    fn seen(live: i32, building: Option<i32>, started_ms: i64, joined_ms: Option<i64>) -> Seen {
        Seen {
            live,
            building,
            started_ms,
            joined_ms,
        }
    }

    fn rerun(at_ms: u64) -> Marker {
        serde_json::from_value(serde_json::json!({
            "from": 1, "until": 10, "rerun": true, "at_ms": at_ms,
            "rewound_at_ms": null, "ordered": false, "stream": "S", "durable": "d"
        }))
        .unwrap_or_else(|e| panic!("a marker: {e}"))
    }

    #[test]
    fn a_new_model_or_handler_is_prepared_first() {
        assert_eq!(decide(None, None), Entry::Prepare(Step::Create));
        let s = seen(1, None, 0, None);
        assert_eq!(decide(Some(&s), None), Entry::Prepare(Step::Register));
    }

    #[test]
    fn without_a_newer_rerun_the_handler_writes_where_it_belongs() {
        assert_eq!(
            decide(Some(&seen(1, None, 0, Some(0))), None),
            Entry::Write(1)
        );
        // Joined the rebuild: writes to it.
        let building = seen(1, Some(2), 100, Some(100));
        assert_eq!(decide(Some(&building), Some(&rerun(100))), Entry::Write(2));
        // Not yet replayed for the rebuild: keeps the live one up to date.
        let other = seen(1, Some(2), 100, Some(0));
        assert_eq!(decide(Some(&other), None), Entry::Write(1));
        // A replay without --rerun changes nothing.
        let mut plain = rerun(500);
        plain.rerun = false;
        assert_eq!(decide(Some(&other), Some(&plain)), Entry::Write(1));
        // After the swap: the rebuilt generation is live.
        let swapped = seen(2, None, 100, Some(100));
        assert_eq!(decide(Some(&swapped), Some(&rerun(100))), Entry::Write(2));
    }

    #[test]
    fn a_rerun_starts_a_rebuild_or_joins_the_one_under_way() {
        assert_eq!(
            decide(Some(&seen(1, None, 0, Some(0))), Some(&rerun(100))),
            Entry::Prepare(Step::Start(100))
        );
        // Another handler's rerun after the rebuild began joins it.
        assert_eq!(
            decide(Some(&seen(1, Some(2), 100, Some(0))), Some(&rerun(150))),
            Entry::Prepare(Step::Join(150))
        );
        // A rerun older than the rebuild is noted, and does not join it.
        assert_eq!(
            decide(Some(&seen(1, Some(2), 100, Some(0))), Some(&rerun(80))),
            Entry::Prepare(Step::Join(80))
        );
        assert_eq!(seen(1, Some(2), 100, Some(80)).target(), 1);
        // The same handler rerun again restarts the rebuild.
        assert_eq!(
            decide(Some(&seen(1, Some(2), 100, Some(100))), Some(&rerun(200))),
            Entry::Prepare(Step::Start(200))
        );
        // An ordered handler's rerun is not a rebuild.
        let mut ordered = rerun(300);
        ordered.ordered = true;
        assert_eq!(
            decide(Some(&seen(1, None, 0, Some(0))), Some(&ordered)),
            Entry::Write(1)
        );
    }
}
