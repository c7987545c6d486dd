//! The shop: four services choreographed only by events.
//!
//! ```text
//! OrderPlaced ──payments──▶ PaymentCaptured ──orders──▶ OrderPaid ──inventory──▶ StockReserved ──shipping──▶ OrderShipped
//!      │                                                   └──inventory──▶ StockUnavailable ──payments──▶ PaymentRefunded ──orders──▶ OrderCancelled
//!      └──payments──▶ PaymentDeclined ──orders──▶ OrderRejected
//! OrderPlaced, no payment answer within the deadline ──orders──▶ OrderExpired
//! PaymentCaptured after the deadline ──orders──▶ PaymentRefused ──payments──▶ PaymentRefunded (late: the order stays expired)
//! StockReserved ──shipping──▶ ParcelTracked (1, 2) ──orders, in order per order──▶ a notice to the customer
//! ```
//!
//! Which orders fail is decided by the order's data, so runs are
//! reproducible: a customer whose card has expired is declined; an order
//! with a sold-out item is refunded and cancelled; a customer whose bank is
//! offline never gets an answer from payments, and the orders service's
//! deadline (`expire_unpaid`) expires the order. Every event is keyed by
//! its order, so each fact exists once per order.
//!
//! The orders service owns the order: a payment answer counts only if its
//! deadline (`expire_unpaid`) was met by it. `confirm_payment` waits for
//! that deadline's decision and turns a payment stored in time into
//! `OrderPaid`, which inventory reserves stock for; a payment stored after
//! the deadline (a payments process killed under load, its event
//! redelivered after `ack_wait`) is refused, and payments refunds it, so an
//! expired order is never shipped and every order ends once. A late
//! decline is ignored the same way (`reject_order`).
//!
//! Every event carries its payload's JSON Schema (`#[event(schema)]`, from
//! `schemars`), so `choreo asyncapi` documents the shop's payloads.
//!
//! The shop keeps its state in Postgres (`choreo-postgres`): each side
//! effect (a charge, a refund, a reservation, a shipment, a notice to the
//! customer) is a row written by a Postgres handler, in one transaction
//! with the handler's inbox row and its emissions, and the orders service
//! keeps the order read model `order_view` (a [`ReadModel`] of six
//! projection handlers). The effect tables have no unique key on purpose:
//! an effect applied twice would be a second row, and the summary counts
//! it as a duplicate; it also checks every order's row in the read model
//! against the order's events.
//!
//! One handler needs order: `notify_customer` tells the customer about
//! each tracking update of their parcel, and an order's updates must reach
//! the customer in the order they happened ("delivered" never before
//! "handed to the carrier"). It is `ordered_by = order_id`, so one order's
//! updates run one at a time, in stream order, on whichever instance of the
//! orders service holds that order's partition, while other orders' run in
//! parallel. The summary counts an order whose notices the `notices` table
//! holds in the wrong order as `misordered`. The other handlers see one
//! event per order and need no order; the read model's projections take
//! events in any order (a status only moves forward).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo::admin::deadlines::{self, DeadlineState};
use choreo::{
    Aggregate, Aggregates, Context, DecideError, Decider, HandlerError, Publisher, Service, State,
    StreamSettings, event, event_handler,
};
use choreo_postgres::sqlx::{self, PgPool};
use choreo_postgres::{Pg, PgError, Postgres, ReadModel};
use choreo_testkit::Recorder;

/// One line of an order.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Line {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// A customer placed an order.
#[event(subject = "orders.{order_id}.placed", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// What.
    pub lines: Vec<Line>,
    /// The amount to charge.
    pub total_cents: u64,
}

/// The payment went through.
#[event(subject = "payments.{order_id}.captured", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct PaymentCaptured {
    /// The order.
    pub order_id: String,
    /// What to reserve.
    pub lines: Vec<Line>,
    /// The amount charged.
    pub amount_cents: u64,
}

/// The card was declined.
#[event(subject = "payments.{order_id}.declined", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct PaymentDeclined {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

/// The orders service accepted the payment: it came within the order's
/// payment deadline. Stock is reserved for a paid order only.
#[event(subject = "orders.{order_id}.paid", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderPaid {
    /// The order.
    pub order_id: String,
    /// What to reserve.
    pub lines: Vec<Line>,
    /// The amount charged.
    pub amount_cents: u64,
}

/// The orders service refused a payment: it was stored after the order's
/// payment deadline, and the order expired. Payments pays it back.
#[event(subject = "orders.{order_id}.payment-refused", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct PaymentRefused {
    /// The order.
    pub order_id: String,
    /// The amount to pay back.
    pub amount_cents: u64,
}

/// Why a charge was paid back.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RefundReason {
    /// An item was out of stock: the order is cancelled.
    #[default]
    OutOfStock,
    /// The payment came after the order expired: the order stays expired.
    LatePayment,
}

/// The charge was paid back: compensation for missing stock, or for a
/// payment that came after its order expired.
#[event(subject = "payments.{order_id}.refunded", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: String,
    /// The amount refunded.
    pub amount_cents: u64,
    /// Why (absent in refunds written before late payments were refunded:
    /// out of stock).
    #[serde(default)]
    pub reason: RefundReason,
}

/// Stock is set aside for the order.
#[event(subject = "inventory.{order_id}.reserved", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
}

/// Some item is out of stock.
#[event(subject = "inventory.{order_id}.unavailable", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct StockUnavailable {
    /// The order.
    pub order_id: String,
    /// The missing product.
    pub sku: String,
    /// The amount to refund.
    pub amount_cents: u64,
}

/// Goods came into the warehouse.
#[event(subject = "stock.{sku}.received", schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct StockReceived {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Why (a run's name, a delivery note).
    pub note: String,
}

/// Units of one product set aside for an order: one per product of the
/// order, all of an order's in one atomic batch.
#[event(subject = "stock.{sku}.allocated", schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct StockAllocated {
    /// The product.
    pub sku: String,
    /// The order.
    pub order_id: String,
    /// How many.
    pub quantity: u32,
}

/// The history of one product's stock.
#[derive(choreo::AggregateEvent, Clone, Debug, PartialEq)]
pub enum StockEvent {
    /// Goods came in.
    Received(StockReceived),
    /// Units were set aside for an order.
    Allocated(StockAllocated),
}

/// One product's stock: an aggregate (`docs/aggregates.md`), so two
/// inventory instances deciding at once never both take the last unit.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stock {
    /// Units not allocated.
    pub on_hand: u32,
}

impl Aggregate for Stock {
    const NAME: &'static str = "Stock";
    type Event = StockEvent;
    fn filter(sku: &str) -> String {
        format!("stock.{sku}.*")
    }
    fn apply(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Received(e) => self.on_hand += e.quantity,
            StockEvent::Allocated(e) => self.on_hand = self.on_hand.saturating_sub(e.quantity),
        }
    }
}

/// An order's lines as products and quantities, each product once, in
/// name order.
pub fn wanted(lines: &[Line]) -> BTreeMap<&str, u32> {
    let mut wanted = BTreeMap::new();
    for l in lines {
        *wanted.entry(l.sku.as_str()).or_insert(0) += l.quantity;
    }
    wanted
}

/// The decision on an order's products: allocate every line, or refuse
/// with the first product short of stock.
pub fn allocate(
    order_id: &str,
    wanted: &BTreeMap<&str, u32>,
    stocks: &[Stock],
) -> Result<Vec<StockEvent>, String> {
    let mut events = Vec::with_capacity(wanted.len());
    for ((sku, quantity), stock) in wanted.iter().zip(stocks) {
        if stock.on_hand < *quantity {
            return Err((*sku).to_owned());
        }
        events.push(StockEvent::Allocated(StockAllocated {
            sku: (*sku).to_owned(),
            order_id: order_id.to_owned(),
            quantity: *quantity,
        }));
    }
    Ok(events)
}

/// The parcel left the warehouse. Ends a successful order.
#[event(subject = "shipping.{order_id}.shipped", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderShipped {
    /// The order.
    pub order_id: String,
    /// The parcel's tracking code.
    pub tracking: String,
}

/// A tracking update of a shipped order's parcel: `step` 1 "handed to the
/// carrier", 2 "delivered". (A carrier would send these over days; the
/// demo's shipping service emits them with the shipment.)
#[event(subject = "shipping.{order_id}.tracked", key = (order_id, step), schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct ParcelTracked {
    /// The order.
    pub order_id: String,
    /// The update's place in the parcel's journey, from 1.
    pub step: u32,
    /// What happened.
    pub status: String,
}

/// How many tracking updates a shipped order's parcel gets.
pub const TRACKING_STEPS: u32 = 2;

/// The order ended because the payment was declined.
#[event(subject = "orders.{order_id}.rejected", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderRejected {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

/// The order ended because stock was missing; its payment was refunded.
#[event(subject = "orders.{order_id}.cancelled", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
}

/// The order ended because payments gave no answer in time (its
/// deadline passed).
#[event(subject = "orders.{order_id}.expired", key = order_id, schema)]
#[derive(Clone, Debug, PartialEq, schemars::JsonSchema)]
pub struct OrderExpired {
    /// The order.
    pub order_id: String,
}

/// The shop's database: where its services record their side effects
/// and keep the order read model, and the deadline lookups of the orders
/// service.
#[derive(Clone, Debug)]
pub struct Ledger {
    js: jetstream::Context,
    pool: PgPool,
}

/// The effect tables. No unique key: an effect applied twice would be a
/// second row, which the summary counts.
const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS charges (order_id text NOT NULL, cents bigint NOT NULL);
    CREATE TABLE IF NOT EXISTS refunds (order_id text NOT NULL, cents bigint NOT NULL, reason text NOT NULL);
    CREATE TABLE IF NOT EXISTS reservations (order_id text NOT NULL, skus text NOT NULL);
    CREATE TABLE IF NOT EXISTS shipments (order_id text NOT NULL, tracking text NOT NULL);
    CREATE TABLE IF NOT EXISTS notices (
        seq bigserial PRIMARY KEY, order_id text NOT NULL, step int NOT NULL);
    CREATE INDEX IF NOT EXISTS notices_order ON notices (order_id);
    CREATE TABLE IF NOT EXISTS orders (
        order_id text PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL,
        lines jsonb NOT NULL, placed_event uuid NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// The order read model: one row per order, its status moved forward by
/// the projections of the order's events, `events` counting how many were
/// applied.
pub static ORDER_VIEW: ReadModel = ReadModel::new(
    "orders",
    "CREATE TABLE order_view (
         order_id    text PRIMARY KEY,
         customer    text,
         total_cents bigint,
         status      text NOT NULL,
         rank        int  NOT NULL,
         events      int  NOT NULL
     )",
);

impl Ledger {
    /// Opens the shop's database on `pool` (creating its tables if
    /// missing) and its deadline lookups on `client`.
    ///
    /// # Errors
    /// The database refused.
    pub async fn open(client: &async_nats::Client, pool: PgPool) -> Result<Self, PgError> {
        let mut tx = pool.begin().await.map_err(sql("begin"))?;
        // Processes that start together take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('choreo.shop'))")
            .execute(&mut *tx)
            .await
            .map_err(sql("lock"))?;
        sqlx::raw_sql(TABLES)
            .execute(&mut *tx)
            .await
            .map_err(sql("create the shop's tables"))?;
        tx.commit().await.map_err(sql("commit"))?;
        Ok(Self {
            js: jetstream::new(client.clone()),
            pool,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The decision of `order`'s payment deadline (`expire_unpaid`, matched
    /// by the flow's correlation id), once it is made: the watcher of
    /// payments' answers decides "met" for an answer stored in time, or the
    /// deadline "fired". Waits up to 20 s, then asks for a retry.
    async fn payment_deadline(&self, ctx: &Context) -> Result<DeadlineState, HandlerError> {
        let token = ctx.correlation_id().to_string();
        let started = Instant::now();
        loop {
            let state = deadlines::deadline(&self.js, "orders", "expire_unpaid", &token)
                .await
                .map_err(HandlerError::retryable)?;
            if matches!(
                state,
                DeadlineState::Met { .. } | DeadlineState::Fired { .. }
            ) {
                return Ok(state);
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(HandlerError::retryable(format!(
                    "the payment deadline is not decided yet: {state:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> PgError {
    move |e| PgError::Config(format!("the shop's database: cannot {what}: {e}"))
}

// ---- the services -------------------------------------------------------------

// Postgres handlers (`idempotent = false`: their inbox is the row
// `Pg::begin` claims in the shop's database, committed with the effect and
// the emissions).

#[event_handler(
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [PaymentCaptured, PaymentDeclined]
)]
async fn charge_payment(order: OrderPlaced, ctx: Context, pg: Pg) -> Result<(), HandlerError> {
    if order.customer.contains("bank-offline") {
        // The bank never answers: no event. The order's deadline ends it.
        return Ok(());
    }
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    if order.customer.contains("expired-card") {
        ctx.emit(PaymentDeclined {
            order_id: order.order_id,
            reason: "card expired".into(),
        });
        return tx.commit().await;
    }
    sqlx::query("INSERT INTO charges (order_id, cents) VALUES ($1, $2)")
        .bind(&order.order_id)
        .bind(order.total_cents as i64)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
        lines: order.lines,
        amount_cents: order.total_cents,
    });
    tx.commit().await
}

/// Pays `amount_cents` of `order_id` back, for `reason`: the refund row and
/// the `PaymentRefunded` event in one transaction.
async fn refund(
    pg: &Pg,
    ctx: &Context,
    order_id: String,
    amount_cents: u64,
    reason: RefundReason,
) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    let why = match reason {
        RefundReason::OutOfStock => "out-of-stock",
        RefundReason::LatePayment => "late-payment",
    };
    sqlx::query("INSERT INTO refunds (order_id, cents, reason) VALUES ($1, $2, $3)")
        .bind(&order_id)
        .bind(amount_cents as i64)
        .bind(why)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    ctx.emit(PaymentRefunded {
        order_id,
        amount_cents,
        reason,
    });
    tx.commit().await
}

#[event_handler(
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = PaymentRefunded
)]
async fn refund_payment(
    missing: StockUnavailable,
    ctx: Context,
    pg: Pg,
) -> Result<(), HandlerError> {
    refund(
        &pg,
        &ctx,
        missing.order_id,
        missing.amount_cents,
        RefundReason::OutOfStock,
    )
    .await
}

/// Pays back a payment the orders service refused: it came after the
/// order expired.
#[event_handler(
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = PaymentRefunded
)]
async fn refund_refused_payment(
    refused: PaymentRefused,
    ctx: Context,
    pg: Pg,
) -> Result<(), HandlerError> {
    refund(
        &pg,
        &ctx,
        refused.order_id,
        refused.amount_cents,
        RefundReason::LatePayment,
    )
    .await
}

/// Decides on the order's products' stock (an aggregate in JetStream),
/// and records the reservation in the shop's database. A redelivery after
/// a decision whose transaction did not commit finds the decision's own
/// events and decides the same.
#[event_handler(
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [StockReserved, StockUnavailable]
)]
async fn reserve_stock(
    payment: OrderPaid,
    ctx: Context,
    stock: Decider,
    pg: Pg,
) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    let wanted = wanted(&payment.lines);
    let skus: Vec<&str> = wanted.keys().copied().collect();
    let decided = stock
        .decide_across::<Vec<Stock>, _, _>(&skus, |stocks| {
            allocate(&payment.order_id, &wanted, stocks)
        })
        .await;
    match decided {
        Ok(_) => {
            sqlx::query("INSERT INTO reservations (order_id, skus) VALUES ($1, $2)")
                .bind(&payment.order_id)
                .bind(skus.join(","))
                .execute(tx.conn())
                .await
                .map_err(HandlerError::retryable)?;
            ctx.emit(StockReserved {
                order_id: payment.order_id,
            });
        }
        Err(DecideError::Refused(sku)) => ctx.emit(StockUnavailable {
            order_id: payment.order_id,
            sku,
            amount_cents: payment.amount_cents,
        }),
        Err(e) => return Err(e.into_handler_error()),
    }
    tx.commit().await
}

#[event_handler(
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [OrderShipped, ParcelTracked]
)]
async fn ship_order(reserved: StockReserved, ctx: Context, pg: Pg) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    let tracking = format!("TRK-{}", ctx.event_id().short());
    sqlx::query("INSERT INTO shipments (order_id, tracking) VALUES ($1, $2)")
        .bind(&reserved.order_id)
        .bind(&tracking)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    ctx.emit(OrderShipped {
        order_id: reserved.order_id.clone(),
        tracking,
    });
    for (step, status) in [(1, "handed to the carrier"), (2, "delivered")] {
        ctx.emit(ParcelTracked {
            order_id: reserved.order_id.clone(),
            step,
            status: status.into(),
        });
    }
    tx.commit().await
}

/// Tells the customer about each tracking update of their parcel (the
/// notice is a row of `notices`, the shop's stand-in for a mail, in the
/// order the notices went out). Ordered by order: an order's updates must
/// reach the customer in the order they happened. In any order, the
/// handler would run an order's two updates at once, and "delivered" could
/// reach the customer first.
#[event_handler(
    ordered_by = order_id,
    idempotent = false,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = []
)]
async fn notify_customer(parcel: ParcelTracked, pg: Pg) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin().await? else {
        return Ok(());
    };
    sqlx::query("INSERT INTO notices (order_id, step) VALUES ($1, $2)")
        .bind(&parcel.order_id)
        .bind(parcel.step as i32)
        .execute(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
    tx.commit().await
}

/// Applies one of an order's events to the order read model: `status` at
/// `rank` replaces a lower one (events of different streams come in any
/// order), `placed` fills the order's own columns.
async fn project(
    pg: &Pg,
    order_id: &str,
    status: &str,
    rank: i32,
    placed: Option<(&str, u64)>,
) -> Result<(), HandlerError> {
    let Some(mut tx) = pg.begin_read_model(&ORDER_VIEW).await? else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO order_view AS v (order_id, customer, total_cents, status, rank, events)
         VALUES ($1, $2, $3, $4, $5, 1)
         ON CONFLICT (order_id) DO UPDATE SET
             customer    = coalesce(EXCLUDED.customer, v.customer),
             total_cents = coalesce(EXCLUDED.total_cents, v.total_cents),
             status      = CASE WHEN EXCLUDED.rank > v.rank THEN EXCLUDED.status ELSE v.status END,
             rank        = greatest(EXCLUDED.rank, v.rank),
             events      = v.events + 1",
    )
    .bind(order_id)
    .bind(placed.map(|p| p.0))
    .bind(placed.map(|p| p.1 as i64))
    .bind(status)
    .bind(rank)
    .execute(tx.conn())
    .await
    .map_err(HandlerError::retryable)?;
    tx.commit().await
}

/// The order read model's projections: one per event of an order's life.
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_placed(e: OrderPlaced, pg: Pg) -> Result<(), HandlerError> {
    project(
        &pg,
        &e.order_id,
        "placed",
        0,
        Some((&e.customer, e.total_cents)),
    )
    .await
}

/// See [`view_placed`].
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_paid(e: OrderPaid, pg: Pg) -> Result<(), HandlerError> {
    project(&pg, &e.order_id, "paid", 1, None).await
}

/// See [`view_placed`].
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_shipped(e: OrderShipped, pg: Pg) -> Result<(), HandlerError> {
    project(&pg, &e.order_id, "shipped", 2, None).await
}

/// See [`view_placed`].
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_cancelled(e: OrderCancelled, pg: Pg) -> Result<(), HandlerError> {
    project(&pg, &e.order_id, "cancelled", 2, None).await
}

/// See [`view_placed`].
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_rejected(e: OrderRejected, pg: Pg) -> Result<(), HandlerError> {
    project(&pg, &e.order_id, "rejected", 2, None).await
}

/// See [`view_placed`].
#[event_handler(idempotent = false, max_deliver = 10, backoff = ["200ms", "1s", "2s"], emits = [])]
async fn view_expired(e: OrderExpired, pg: Pg) -> Result<(), HandlerError> {
    project(&pg, &e.order_id, "expired", 2, None).await
}

/// Accepts a payment that met the order's deadline (`OrderPaid`), and
/// refuses one stored after it (`PaymentRefused`): the order has expired.
#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [OrderPaid, PaymentRefused]
)]
async fn confirm_payment(
    payment: PaymentCaptured,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    match ledger.payment_deadline(&ctx).await? {
        DeadlineState::Met { by, .. } if by == ctx.event_id() => ctx.emit(OrderPaid {
            order_id: payment.order_id,
            lines: payment.lines,
            amount_cents: payment.amount_cents,
        }),
        state => {
            tracing::info!(order = %payment.order_id, ?state, "a payment after the order's deadline; refusing it");
            ctx.emit(PaymentRefused {
                order_id: payment.order_id,
                amount_cents: payment.amount_cents,
            });
        }
    }
    Ok(())
}

/// Rejects an order whose payment was declined in time; a decline stored
/// after the deadline changes nothing (the order expired, no money moved).
#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = OrderRejected
)]
async fn reject_order(
    declined: PaymentDeclined,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    match ledger.payment_deadline(&ctx).await? {
        DeadlineState::Met { by, .. } if by == ctx.event_id() => ctx.emit(OrderRejected {
            order_id: declined.order_id,
            reason: declined.reason,
        }),
        state => {
            tracing::info!(order = %declined.order_id, ?state, "a decline after the order's deadline; the order stays expired");
        }
    }
    Ok(())
}

/// Cancels an order whose payment was refunded for missing stock; a late
/// payment's refund leaves its order expired.
#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = OrderCancelled
)]
async fn cancel_order(refunded: PaymentRefunded, ctx: Context) {
    if refunded.reason == RefundReason::OutOfStock {
        ctx.emit(OrderCancelled {
            order_id: refunded.order_id,
        });
    }
}

/// Expires an order that payments has not answered (captured or
/// declined) in time. Declared as 15 minutes, as a real shop would; the
/// demo runs it with [`PAYMENT_DEADLINE`] through `Service::deadline_within`.
/// The order's events cannot overtake each other here: the deadline and
/// the payment's answer are decided once per order, whichever comes first.
#[event_handler(
    within = "15m", unless = [PaymentCaptured, PaymentDeclined],
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = OrderExpired
)]
async fn expire_unpaid(order: OrderPlaced, ctx: Context) {
    ctx.emit(OrderExpired {
        order_id: order.order_id,
    });
}

/// How long the demo's orders wait for payments' answer: short, so a run
/// ends soon after its last order. [`service_with_deadline`] takes another.
pub const PAYMENT_DEADLINE: Duration = Duration::from_secs(5);

/// The shop's services, by name.
pub const SERVICES: [&str; 4] = ["orders", "payments", "inventory", "shipping"];

/// The service `name` (one of [`SERVICES`]), ready to start, with its
/// Postgres (migrated, its relay running).
///
/// # Errors
/// An unknown name, or the database refused.
pub async fn service(
    name: &str,
    ledger: Ledger,
    settings: StreamSettings,
) -> Result<Service, ShopError> {
    service_with_deadline(name, ledger, settings, PAYMENT_DEADLINE).await
}

/// A shop service could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShopError {
    /// No service has that name.
    #[error("no service named {0:?}; the services are {SERVICES:?}")]
    UnknownService(String),
    /// The database refused.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// The publisher could not be made.
    #[error(transparent)]
    Publish(#[from] choreo::PublishError),
}

/// [`service`], with the orders' payment deadline `deadline`: longer than
/// any payments outage a run means to survive (a run that kills nodes
/// needs more than the 4–9 s of an election), or a late payment would
/// find its order expired.
///
/// # Errors
/// As [`service`].
pub async fn service_with_deadline(
    name: &str,
    ledger: Ledger,
    settings: StreamSettings,
    deadline: Duration,
) -> Result<Service, ShopError> {
    if !SERVICES.contains(&name) {
        return Err(ShopError::UnknownService(name.to_owned()));
    }
    let publisher = Publisher::new(ledger.js.client(), name)?.stream_settings(settings.clone());
    let postgres = Postgres::start(ledger.pool.clone(), &publisher).await?;
    let s = Service::new(name)
        .state(ledger.clone())
        .state(postgres)
        .stream_settings(settings)
        .shutdown_grace(Duration::from_secs(10));
    Ok(match name {
        "orders" => s
            .handler(confirm_payment)
            .handler(reject_order)
            .handler(cancel_order)
            .handler(notify_customer)
            .handler(view_placed)
            .handler(view_paid)
            .handler(view_shipped)
            .handler(view_cancelled)
            .handler(view_rejected)
            .handler(view_expired)
            .deadline_within(expire_unpaid, deadline),
        "payments" => s
            .handler(charge_payment)
            .handler(refund_payment)
            .handler(refund_refused_payment),
        "inventory" => s
            .state(Aggregates::new(publisher))
            .aggregate::<Stock>()
            .handler(reserve_stock),
        _ => s.handler(ship_order),
    })
}

/// How order `i` of a run goes: every 10th order from the 8th is declined,
/// every 10th from the 4th has a sold-out item, every 10th from the 6th
/// gets no payment answer and expires; the rest ship.
pub fn order(run: &str, i: u64) -> OrderPlaced {
    let customer = match i % 10 {
        7 => "mallory-expired-card",
        5 => "bob-bank-offline",
        _ => "alice",
    };
    let mut lines = vec![Line {
        sku: "teapot".into(),
        quantity: 1 + (i % 3) as u32,
    }];
    if i % 10 == 3 {
        lines.push(Line {
            sku: "sold-out-lamp".into(),
            quantity: 1,
        });
    }
    let total_cents = lines.iter().map(|l| u64::from(l.quantity) * 1999).sum();
    OrderPlaced {
        order_id: format!("{run}-{i}"),
        customer: customer.into(),
        lines,
        total_cents,
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Orders placed.
    pub orders: u64,
    /// Orders that ended in `OrderShipped`.
    pub shipped: u64,
    /// Orders that ended in `OrderCancelled`.
    pub cancelled: u64,
    /// Orders that ended in `OrderRejected`.
    pub rejected: u64,
    /// Orders that ended in `OrderExpired` (their payment deadline passed).
    pub expired: u64,
    /// Tracking notices the customers got ([`TRACKING_STEPS`] per shipped
    /// order).
    pub notices: u64,
    /// Event ids stored more than once, plus effects recorded more than once.
    pub duplicates: u64,
    /// Orders whose customer got their tracking notices in the wrong order.
    pub misordered: u64,
    /// Orders with no ending.
    pub lost: u64,
    /// Orders with more than one ending (shipped and expired, say): a
    /// choreography bug, which fails the run.
    pub ended_twice: u64,
    /// Payments that came after their order expired, refused by orders and
    /// paid back by payments (`PaymentRefunded` caused by `PaymentRefused`).
    pub late_refunds: u64,
    /// Payments refused that were not (yet) paid back.
    pub unrefunded: u64,
    /// Ended orders whose row in the order read model disagrees with their
    /// events (another status, or another count of events applied): a
    /// projection that lost or doubled an event.
    pub view_wrong: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "orders={} shipped={} cancelled={} rejected={} expired={} notices={} late_refunds={} duplicates={} misordered={} lost={} ended_twice={} unrefunded={} view_wrong={}",
            self.orders,
            self.shipped,
            self.cancelled,
            self.rejected,
            self.expired,
            self.notices,
            self.late_refunds,
            self.duplicates,
            self.misordered,
            self.lost,
            self.ended_twice,
            self.unrefunded,
            self.view_wrong
        )
    }
}

impl Summary {
    /// Whether every order ended once, nothing happened twice, every late
    /// payment was paid back, and every shipped order's customer got its
    /// notices, in order.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.ended_twice == 0
            && self.unrefunded == 0
            && self.duplicates == 0
            && self.misordered == 0
            && self.view_wrong == 0
            && self.notices == self.shipped * u64::from(TRACKING_STEPS)
            && self.shipped + self.cancelled + self.rejected + self.expired == self.orders
    }

    /// What the order data says the run must end with.
    pub fn expected(n: u64) -> Self {
        let rejected = (0..n).filter(|i| i % 10 == 7).count() as u64;
        let cancelled = (0..n).filter(|i| i % 10 == 3).count() as u64;
        let expired = (0..n).filter(|i| i % 10 == 5).count() as u64;
        let shipped = n - rejected - cancelled - expired;
        Self {
            orders: n,
            shipped,
            cancelled,
            rejected,
            expired,
            notices: shipped * u64::from(TRACKING_STEPS),
            duplicates: 0,
            misordered: 0,
            lost: 0,
            ended_twice: 0,
            late_refunds: 0,
            unrefunded: 0,
            view_wrong: 0,
        }
    }

    /// [`is_clean`](Self::is_clean), and the endings the order data says,
    /// but for orders whose payment answer came after their deadline: what
    /// a run that kills processes may end with. Such an order expired
    /// instead; if it was charged (it would have shipped or been cancelled)
    /// its payment was refunded, counted in `late_refunds`, and a late
    /// decline changed nothing.
    pub fn is_expected_with_late_payments(&self) -> bool {
        let e = Self::expected(self.orders);
        let (Some(late_shipped), Some(late_cancelled), Some(late_rejected)) = (
            e.shipped.checked_sub(self.shipped),
            e.cancelled.checked_sub(self.cancelled),
            e.rejected.checked_sub(self.rejected),
        ) else {
            return false;
        };
        self.is_clean()
            && self.late_refunds == late_shipped + late_cancelled
            && self.expired == e.expired + late_shipped + late_cancelled + late_rejected
    }
}

/// Counts the endings of `run`'s `n` orders from what the recorder saw, the
/// duplicates in the event streams and the effect tables, the customers'
/// notices, and the read model's rows against the orders' events.
///
/// # Errors
/// The database could not be read: the count would be a guess, so the run
/// must fail rather than pass.
pub async fn summarize(
    recorder: &Recorder,
    ledger: &Ledger,
    run: &str,
    n: u64,
) -> Result<Summary, LedgerError> {
    let scanned = scan(recorder, run, n);
    let mut summary = scanned.summary;
    let db = read_db(ledger.pool(), run).await?;
    summary.duplicates = scanned.duplicate_ids + db.duplicates;
    summary.notices = db.notices;
    summary.misordered = db.misordered;
    summary.view_wrong = scanned
        .orders
        .iter()
        .filter(|(order, seen)| {
            // Orders lost or ended twice are counted as such already.
            seen.endings.len() == 1
                && db.view.get(*order) != Some(&(seen.endings[0].to_owned(), seen.view_events))
        })
        .count() as u64;
    Ok(summary)
}

/// The shop's database could not be read, so effects cannot be counted.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the shop's database to count its effects: {0}")]
pub struct LedgerError(String);

/// The endings of `run`'s orders (no database read: cheap enough for a
/// progress display), with `notices`, `duplicates`, `misordered` and
/// `view_wrong` left at 0.
pub fn summarize_endings(recorder: &Recorder, run: &str, n: u64) -> Summary {
    scan(recorder, run, n).summary
}

/// What the recorder saw of one order.
#[derive(Default)]
struct OrderSeen {
    /// Every ending it has, not the last only: an order that ended twice
    /// must show.
    endings: Vec<&'static str>,
    /// Its events the read model applies.
    view_events: i32,
}

/// What the recorder saw of a run.
struct Scanned {
    summary: Summary,
    /// Event ids the streams hold more than once.
    duplicate_ids: u64,
    orders: HashMap<String, OrderSeen>,
}

fn scan(recorder: &Recorder, run: &str, n: u64) -> Scanned {
    scan_records(&recorder.snapshot(), run, n)
}

/// [`scan`] over recorded events.
fn scan_records(records: &[choreo_testkit::Recorded], run: &str, n: u64) -> Scanned {
    let prefix = format!("{run}-");
    let mut orders: HashMap<String, OrderSeen> = HashMap::new();
    let mut ids = HashSet::new();
    let mut refused = HashSet::new();
    let mut refunds_of_refused = HashSet::new();
    let mut duplicate_ids = 0;
    for r in records {
        let Some(order) = r.subject.split('.').nth(1) else {
            continue;
        };
        if !order.starts_with(&prefix) {
            continue;
        }
        if !ids.insert(r.meta.id()) {
            duplicate_ids += 1;
            continue;
        }
        let ending = match r.meta.event_type() {
            "OrderShipped" => "shipped",
            "OrderCancelled" => "cancelled",
            "OrderRejected" => "rejected",
            "OrderExpired" => "expired",
            "OrderPlaced" | "OrderPaid" => {
                orders.entry(order.to_owned()).or_default().view_events += 1;
                continue;
            }
            "PaymentRefused" => {
                refused.insert(r.meta.id());
                continue;
            }
            "PaymentRefunded" => {
                if let Some(cause) = r.meta.causation_id() {
                    refunds_of_refused.insert(cause);
                }
                continue;
            }
            _ => continue,
        };
        let seen = orders.entry(order.to_owned()).or_default();
        seen.endings.push(ending);
        seen.view_events += 1;
    }
    let count = |what| {
        orders
            .values()
            .filter(|o| o.endings.len() == 1 && o.endings[0] == what)
            .count() as u64
    };
    let ended = orders.values().filter(|o| !o.endings.is_empty()).count() as u64;
    let late_refunds = refused.intersection(&refunds_of_refused).count() as u64;
    let summary = Summary {
        orders: n,
        shipped: count("shipped"),
        cancelled: count("cancelled"),
        rejected: count("rejected"),
        expired: count("expired"),
        notices: 0,
        duplicates: 0,
        misordered: 0,
        lost: n.saturating_sub(ended),
        ended_twice: orders.values().filter(|o| o.endings.len() > 1).count() as u64,
        late_refunds,
        unrefunded: refused.len() as u64 - late_refunds,
        view_wrong: 0,
    };
    Scanned {
        summary,
        duplicate_ids,
        orders,
    }
}

/// What the shop's database holds of a run.
#[derive(Default)]
struct DbCount {
    /// Effect rows beyond one per effect.
    duplicates: u64,
    /// Tracking notices.
    notices: u64,
    /// Orders with a notice written after a later one.
    misordered: u64,
    /// The read model: per order, its status and how many events it
    /// applied.
    view: HashMap<String, (String, i32)>,
}

/// Reads `run`'s rows: effects written twice, notices and their order, and
/// the order read model.
async fn read_db(pool: &PgPool, run: &str) -> Result<DbCount, LedgerError> {
    let fail = |e: sqlx::Error| LedgerError(e.to_string());
    let prefix = format!("{run}-");
    let of_run = "left(order_id, length($1)) = $1";
    let duplicates: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) - count(DISTINCT order_id) FROM charges WHERE {of_run})
              + (SELECT count(*) - count(DISTINCT (order_id, reason)) FROM refunds WHERE {of_run})
              + (SELECT count(*) - count(DISTINCT order_id) FROM reservations WHERE {of_run})
              + (SELECT count(*) - count(DISTINCT order_id) FROM shipments WHERE {of_run})
              + (SELECT count(*) - count(DISTINCT (order_id, step)) FROM notices WHERE {of_run})"
    ))
    .bind(&prefix)
    .fetch_one(pool)
    .await
    .map_err(fail)?;
    let notices: i64 = sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT (order_id, step)) FROM notices WHERE {of_run}"
    ))
    .bind(&prefix)
    .fetch_one(pool)
    .await
    .map_err(fail)?;
    let misordered: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT a.order_id) FROM notices a
         JOIN notices b ON a.order_id = b.order_id AND a.step > b.step AND a.seq < b.seq
         WHERE left(a.order_id, length($1)) = $1",
    )
    .bind(&prefix)
    .fetch_one(pool)
    .await
    .map_err(fail)?;
    // The view exists once the orders service's projections ran.
    let rows: Vec<(String, String, i32)> = match sqlx::query_as(&format!(
        "SELECT order_id, status, events FROM order_view WHERE {of_run}"
    ))
    .bind(&prefix)
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(fail(e)),
    };
    Ok(DbCount {
        duplicates: duplicates.max(0) as u64,
        notices: notices.max(0) as u64,
        misordered: misordered.max(0) as u64,
        view: rows
            .into_iter()
            .map(|(order, status, events)| (order, (status, events)))
            .collect(),
    })
}

/// Waits until every order of `run` has ended, its customer got its
/// notices and the read model shows it, or nothing has changed for
/// `stall`; `progress` is called with the running summary.
///
/// # Errors
/// See [`summarize`].
pub async fn wait_for_endings(
    recorder: &Recorder,
    ledger: &Ledger,
    run: &str,
    n: u64,
    stall: Duration,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary, LedgerError> {
    let mut last_change = Instant::now();
    let mut last_ended = u64::MAX;
    loop {
        let s = summarize_endings(recorder, run, n);
        progress(&s);
        let ended = s.shipped + s.cancelled + s.rejected + s.expired + s.ended_twice;
        if ended != last_ended {
            last_ended = ended;
            last_change = Instant::now();
        }
        if (ended >= n && s.unrefunded == 0) || last_change.elapsed() > stall {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The notices and the read model follow the endings: read until they
    // are all there, or stop changing.
    let mut last = (u64::MAX, u64::MAX);
    let mut last_change = Instant::now();
    loop {
        let s = summarize(recorder, ledger, run, n).await?;
        if (s.notices >= s.shipped * u64::from(TRACKING_STEPS) && s.view_wrong == 0)
            || last_change.elapsed() > stall
        {
            return Ok(s);
        }
        if (s.notices, s.view_wrong) != last {
            last = (s.notices, s.view_wrong);
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Receives the stock `run`'s `n` orders need of every product that is
/// not sold out, so only the orders with a sold-out item are short.
///
/// # Errors
/// The receipt could not be appended.
pub async fn receive_stock(
    publisher: &Publisher,
    run: &str,
    n: u64,
) -> Result<(), DecideError<std::convert::Infallible>> {
    let mut needed: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..n {
        for line in order(run, i).lines {
            if !line.sku.starts_with("sold-out") {
                *needed.entry(line.sku).or_insert(0) += line.quantity;
            }
        }
    }
    let warehouse = Aggregates::new(publisher.clone());
    for (sku, quantity) in needed {
        warehouse
            .decide::<Stock, _, _>(&sku, |_| {
                Ok(vec![StockEvent::Received(StockReceived {
                    sku: sku.clone(),
                    quantity,
                    note: format!("run {run}"),
                })])
            })
            .await?;
    }
    Ok(())
}

/// Places `n` orders for `run`, 256 publishes in flight, after receiving
/// the stock they need ([`receive_stock`]).
///
/// # Errors
/// The stock could not be received, or a publish failed after its
/// retries.
pub async fn place_orders(
    publisher: &Publisher,
    run: &str,
    n: u64,
) -> Result<Vec<choreo::EventId>, Box<dyn std::error::Error + Send + Sync>> {
    use futures::{StreamExt, TryStreamExt};
    receive_stock(publisher, run, n).await?;
    futures::stream::iter(0..n)
        .map(|i| {
            let p = publisher.clone();
            let o = order(run, i);
            async move { p.publish(&o).await.map(|r| r.event_id) }
        })
        .buffered(256)
        .try_collect()
        .await
        .map_err(Into::into)
}

/// The storefront on the shop's database, publishing as `storefront` with
/// `settings`: its own Postgres store (migrated, its relay running) and
/// outbox.
///
/// # Errors
/// The database refused, or the publisher could not be made.
pub async fn storefront(
    ledger: &Ledger,
    settings: StreamSettings,
) -> Result<crate::storefront::Storefront, ShopError> {
    let publisher = Publisher::new(ledger.js.client(), "storefront")?.stream_settings(settings);
    let postgres = Postgres::start(ledger.pool.clone(), &publisher).await?;
    let outbox = postgres.outbox(&publisher);
    Ok(crate::storefront::Storefront::new(postgres, outbox))
}

/// [`storefront`], publishing the unsafe way (the row committed, then a
/// publish): the benchmark's baseline only.
///
/// # Errors
/// As [`storefront`].
pub async fn unsafe_storefront(
    ledger: &Ledger,
    settings: StreamSettings,
) -> Result<crate::storefront::Storefront, ShopError> {
    let publisher = Publisher::new(ledger.js.client(), "storefront")?.stream_settings(settings);
    let postgres = Postgres::start(ledger.pool.clone(), &publisher).await?;
    Ok(crate::storefront::Storefront::unsafe_direct(
        postgres, publisher,
    ))
}

/// Serves `storefront` on `listener` until the task is dropped; returns
/// the address it serves on.
///
/// # Errors
/// The listener has no address.
pub fn serve_storefront(
    storefront: crate::storefront::Storefront,
    listener: tokio::net::TcpListener,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = listener.local_addr()?;
    let app = crate::storefront::router(storefront);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the storefront stopped");
        }
    });
    Ok((addr, task))
}

/// How many requests [`place_orders_http`] has in flight (one connection
/// each).
pub const HTTP_IN_FLIGHT: usize = 32;

/// Places `n` orders for `run` as `POST /orders` requests to the
/// storefront at `addr`, [`HTTP_IN_FLIGHT`] at a time, after receiving the
/// stock they need ([`receive_stock`], through `publisher`). Returns each
/// order's `OrderPlaced` id, in order.
///
/// # Errors
/// The stock could not be received, or a request failed or was refused.
pub async fn place_orders_http(
    publisher: &Publisher,
    addr: std::net::SocketAddr,
    run: &str,
    n: u64,
) -> Result<Vec<choreo::EventId>, Box<dyn std::error::Error + Send + Sync>> {
    receive_stock(publisher, run, n).await?;
    Ok(post_orders(addr, run, n).await?)
}

/// Posts `run`'s `n` orders to the storefront at `addr`,
/// [`HTTP_IN_FLIGHT`] at a time, one keep-alive connection each; returns
/// each order's `OrderPlaced` id, in order.
///
/// # Errors
/// A request failed, or was answered other than 200 or 201.
pub async fn post_orders(
    addr: std::net::SocketAddr,
    run: &str,
    n: u64,
) -> Result<Vec<choreo::EventId>, String> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..HTTP_IN_FLIGHT {
        let (next, run) = (next.clone(), run.to_owned());
        tasks.spawn(async move {
            let mut client = crate::http::HttpClient::new(addr);
            let mut placed = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(placed);
                }
                let o = order(&run, i);
                let body = serde_json::to_vec(&crate::storefront::NewOrder {
                    order_id: o.order_id,
                    customer: o.customer,
                    lines: o.lines,
                })
                .map_err(|e| e.to_string())?;
                let answer = client
                    .post_json("/orders", &body)
                    .await
                    .map_err(|e| format!("POST /orders: {e}"))?;
                if !matches!(answer.status, 200 | 201) {
                    return Err(format!(
                        "POST /orders answered {}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
                let p: crate::storefront::Placed =
                    serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
                placed.push((i, p.event_id));
            }
        });
    }
    let mut all = Vec::with_capacity(n as usize);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.map_err(|e| e.to_string())??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, id)| id).collect())
}
