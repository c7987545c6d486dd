//! The shop's storefront: a web service (axum) where orders come in.
//!
//! `POST /orders` (JSON: `order_id`, `customer`, `lines`) writes the order
//! row and stages `OrderPlaced` in one transaction of the shop's Postgres
//! ([`Outbox`]), then answers `201` with the order id and the event's id;
//! the event is published right after the commit, or by the relay if the
//! process dies first. Placing an order id again answers `200` and stages
//! nothing (the row is there: its event was staged with it). `GET
//! /orders/{id}` reads the order read model (`order_view`), waiting up to
//! 2 s for it to have applied the order's `OrderPlaced` (read your own
//! writes), and answers `404` for an order it does not know.

use std::time::Duration;

use axum::Router;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use choreo::EventId;
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Outbox, Postgres};
use serde::{Deserialize, Serialize};

use crate::shop::{Line, ORDER_VIEW, OrderPlaced};

/// The storefront's state: the shop's database and how it publishes.
#[derive(Clone, Debug)]
pub struct Storefront {
    postgres: Postgres,
    publish: Publish,
}

/// How the storefront publishes `OrderPlaced`.
#[derive(Clone, Debug)]
enum Publish {
    /// Staged with the row, published at the commit.
    Outbox(Outbox),
    /// The dual write the outbox avoids: the row committed, then a
    /// publish. Only the benchmark's baseline uses it.
    Direct(choreo::Publisher),
}

impl Storefront {
    /// A storefront on `postgres` (the shop's database, its relay running)
    /// that publishes through `outbox`.
    pub fn new(postgres: Postgres, outbox: Outbox) -> Self {
        Self {
            postgres,
            publish: Publish::Outbox(outbox),
        }
    }

    /// A storefront that commits the order row and then publishes with
    /// `publisher`: a crash in between leaves a row with no event. Unsafe;
    /// for the benchmark's baseline only (`bench --only storefront`).
    pub fn unsafe_direct(postgres: Postgres, publisher: choreo::Publisher) -> Self {
        Self {
            postgres,
            publish: Publish::Direct(publisher),
        }
    }

    fn pool(&self) -> &PgPool {
        self.postgres.pool()
    }
}

/// The body of `POST /orders`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewOrder {
    /// The order's id, chosen by the client, so a retried request places
    /// the order once.
    pub order_id: String,
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<Line>,
}

/// The answer to `POST /orders`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Placed {
    /// The order.
    pub order_id: String,
    /// Its `OrderPlaced` event.
    pub event_id: EventId,
}

/// An order as `GET /orders/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderView {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: Option<String>,
    /// The amount.
    pub total_cents: Option<i64>,
    /// Where it is: placed, paid, shipped, cancelled, rejected, expired.
    pub status: String,
}

/// The price of a unit, in cents (the shop sells at one price).
pub const UNIT_CENTS: u64 = 1999;

/// The storefront's routes.
pub fn router(storefront: Storefront) -> Router {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .with_state(storefront)
}

/// A failure, as a status and a line of text.
struct Failed(StatusCode, String);

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Failed {
    Failed(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

async fn place(
    State(s): State<Storefront>,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<Placed>), Failed> {
    if order.order_id.is_empty() || order.lines.is_empty() {
        return Err(Failed(
            StatusCode::UNPROCESSABLE_ENTITY,
            "an order needs an order_id and at least one line".into(),
        ));
    }
    let total_cents: u64 = order
        .lines
        .iter()
        .map(|l| u64::from(l.quantity) * UNIT_CENTS)
        .sum();
    let event = OrderPlaced {
        order_id: order.order_id.clone(),
        customer: order.customer.clone(),
        lines: order.lines.clone(),
        total_cents,
    };
    let lines = serde_json::to_string(&order.lines).map_err(unavailable)?;
    let mut tx = s.pool().begin().await.map_err(unavailable)?;
    let (staged, event_id) = match &s.publish {
        Publish::Outbox(outbox) => {
            let staged = outbox.stage(&mut tx, &event).await.map_err(unavailable)?;
            let id = staged.event_ids()[0];
            (Some(staged), id)
        }
        Publish::Direct(_) => (None, choreo::EventId::new_random()),
    };
    let inserted = sqlx::query(
        "INSERT INTO orders (order_id, customer, total_cents, lines, placed_event)
         VALUES ($1, $2, $3, $4::jsonb, $5::uuid) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&order.order_id)
    .bind(&order.customer)
    .bind(total_cents as i64)
    .bind(lines)
    .bind(event_id.to_string())
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?
    .rows_affected();
    if inserted == 0 {
        // Placed before: its event was staged with its row.
        drop(staged);
        tx.rollback().await.map_err(unavailable)?;
        return Ok((
            StatusCode::OK,
            Json(Placed {
                order_id: order.order_id,
                event_id,
            }),
        ));
    }
    let event_id = match (&s.publish, staged) {
        (Publish::Outbox(outbox), Some(staged)) => {
            outbox.commit(tx, staged).await.map_err(unavailable)?;
            event_id
        }
        (Publish::Direct(publisher), _) => {
            tx.commit().await.map_err(unavailable)?;
            publisher
                .publish(&event)
                .await
                .map_err(unavailable)?
                .event_id
        }
        (Publish::Outbox(_), None) => unreachable!("an outbox stages the event"),
    };
    Ok((
        StatusCode::CREATED,
        Json(Placed {
            order_id: order.order_id,
            event_id,
        }),
    ))
}

async fn show(
    State(s): State<Storefront>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Failed> {
    let placed: Option<String> =
        sqlx::query_scalar("SELECT placed_event::text FROM orders WHERE order_id = $1")
            .bind(&id)
            .fetch_optional(s.pool())
            .await
            .map_err(unavailable)?;
    let Some(placed) = placed else {
        return Err(Failed(StatusCode::NOT_FOUND, format!("no order {id}")));
    };
    let event_id: EventId = placed.parse().map_err(unavailable)?;
    // Read your own writes: the view has the order once it applied its
    // OrderPlaced.
    s.postgres
        .wait_applied(&ORDER_VIEW, event_id, Duration::from_secs(2))
        .await
        .map_err(unavailable)?;
    let row: Option<(String, Option<String>, Option<i64>, String)> = sqlx::query_as(
        "SELECT order_id, customer, total_cents, status FROM order_view WHERE order_id = $1",
    )
    .bind(&id)
    .fetch_optional(s.pool())
    .await
    .map_err(unavailable)?;
    let (order_id, customer, total_cents, status) =
        row.ok_or_else(|| Failed(StatusCode::NOT_FOUND, format!("no order {id}")))?;
    Ok(Json(OrderView {
        order_id,
        customer,
        total_cents,
        status,
    }))
}

/// Waits until a storefront process started with `shop --service
/// storefront --listen ADDR` prints that it is ready on `stdout` (its
/// lines are read on a thread of their own to the end, so the process never
/// blocks on a full pipe).
///
/// # Errors
/// It did not say so within `within`.
pub fn wait_ready(stdout: std::process::ChildStdout, within: Duration) -> Result<(), String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if l.starts_with("storefront ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(within)
        .map_err(|_| format!("the storefront did not start in {within:?}"))
}
