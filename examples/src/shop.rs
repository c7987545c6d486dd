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
//! Each service's side effect (a charge, a refund, a reservation, a shipment,
//! a notice to the customer) is written to the ledger stream `SHOP_LEDGER`
//! with `ctx.idempotency_key()` as its `Nats-Msg-Id`, as the README tells
//! users to do; the summary counts an effect that happened twice as a
//! duplicate.
//!
//! One handler needs order: `notify_customer` tells the customer about
//! each tracking update of their parcel, and an order's updates must reach
//! the customer in the order they happened ("delivered" never before
//! "handed to the carrier"). It is `ordered_by = order_id`, so one order's
//! updates run one at a time, in stream order, on whichever instance of the
//! orders service holds that order's partition, while other orders' run in
//! parallel. The summary counts an order whose notices the ledger holds in
//! the wrong order as `misordered`. The other handlers see one event per
//! order and need no order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use choreo::admin::deadlines::{self, DeadlineState};
use choreo::{
    Aggregate, Aggregates, Context, DecideError, Decider, HandlerError, Publisher, Service, State,
    StreamSettings, event, event_handler,
};
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
#[derive(Clone, Debug, Default)]
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

/// The ledger: where services record their side effects, deduplicated by
/// idempotency key.
#[derive(Clone, Debug)]
pub struct Ledger {
    js: jetstream::Context,
}

/// The ledger stream.
pub const LEDGER_STREAM: &str = "SHOP_LEDGER";

impl Ledger {
    /// Opens the ledger, creating its stream if missing.
    ///
    /// # Errors
    /// JetStream refused.
    pub async fn open(
        client: &async_nats::Client,
        replicas: usize,
    ) -> Result<Self, async_nats::Error> {
        let js = jetstream::new(client.clone());
        if js.get_stream(LEDGER_STREAM).await.is_err() {
            let created = js
                .create_stream(jetstream::stream::Config {
                    name: LEDGER_STREAM.into(),
                    subjects: vec!["ledger.>".into()],
                    num_replicas: replicas,
                    duplicate_window: Duration::from_secs(600),
                    ..Default::default()
                })
                .await;
            if let Err(e) = created
                && js.get_stream(LEDGER_STREAM).await.is_err()
            {
                return Err(e.into());
            }
        }
        Ok(Self { js })
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

    /// Records `effect` on `order`, once per idempotency key.
    async fn record(&self, ctx: &Context, effect: &str, order: &str) -> Result<(), HandlerError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", ctx.idempotency_key());
        let subject = format!("ledger.{}.{effect}.{order}", ctx.service());
        self.js
            .publish_with_headers(subject, headers, bytes::Bytes::new())
            .await
            .map_err(HandlerError::retryable)?
            .await
            .map_err(HandlerError::retryable)?;
        Ok(())
    }
}

// ---- the services -------------------------------------------------------------

#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [PaymentCaptured, PaymentDeclined]
)]
async fn charge_payment(
    order: OrderPlaced,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    if order.customer.contains("bank-offline") {
        // The bank never answers: no event. The order's deadline ends it.
        return Ok(());
    }
    if order.customer.contains("expired-card") {
        ctx.emit(PaymentDeclined {
            order_id: order.order_id,
            reason: "card expired".into(),
        });
        return Ok(());
    }
    ledger.record(&ctx, "charge", &order.order_id).await?;
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
        lines: order.lines,
        amount_cents: order.total_cents,
    });
    Ok(())
}

#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = PaymentRefunded
)]
async fn refund_payment(
    missing: StockUnavailable,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    ledger.record(&ctx, "refund", &missing.order_id).await?;
    ctx.emit(PaymentRefunded {
        order_id: missing.order_id,
        amount_cents: missing.amount_cents,
        reason: RefundReason::OutOfStock,
    });
    Ok(())
}

/// Pays back a payment the orders service refused: it came after the
/// order expired.
#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = PaymentRefunded
)]
async fn refund_refused_payment(
    refused: PaymentRefused,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    ledger.record(&ctx, "refund", &refused.order_id).await?;
    ctx.emit(PaymentRefunded {
        order_id: refused.order_id,
        amount_cents: refused.amount_cents,
        reason: RefundReason::LatePayment,
    });
    Ok(())
}

#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [StockReserved, StockUnavailable]
)]
async fn reserve_stock(
    payment: OrderPaid,
    ctx: Context,
    stock: Decider,
) -> Result<(), HandlerError> {
    let wanted = wanted(&payment.lines);
    let skus: Vec<&str> = wanted.keys().copied().collect();
    let decided = stock
        .decide_across::<Vec<Stock>, _, _>(&skus, |stocks| {
            allocate(&payment.order_id, &wanted, stocks)
        })
        .await;
    match decided {
        Ok(_) => ctx.emit(StockReserved {
            order_id: payment.order_id,
        }),
        Err(DecideError::Refused(sku)) => ctx.emit(StockUnavailable {
            order_id: payment.order_id,
            sku,
            amount_cents: payment.amount_cents,
        }),
        Err(e) => return Err(e.into_handler_error()),
    }
    Ok(())
}

#[event_handler(
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = [OrderShipped, ParcelTracked]
)]
async fn ship_order(
    reserved: StockReserved,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    ledger.record(&ctx, "ship", &reserved.order_id).await?;
    let tracking = format!("TRK-{}", ctx.event_id().short());
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
    Ok(())
}

/// Tells the customer about each tracking update of their parcel (the
/// notice is written to the ledger, the shop's stand-in for a mail).
/// Ordered by order: an order's updates must reach the customer in the
/// order they happened. In any order, the handler would run an order's two
/// updates at once, and "delivered" could reach the customer first.
#[event_handler(
    ordered_by = order_id,
    max_deliver = 10, backoff = ["200ms", "1s", "2s"], ack_wait = "5s",
    emits = []
)]
async fn notify_customer(
    parcel: ParcelTracked,
    ctx: Context,
    State(ledger): State<Ledger>,
) -> Result<(), HandlerError> {
    let notice = format!("notice-{}", parcel.step);
    ledger.record(&ctx, &notice, &parcel.order_id).await
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

/// The service `name` (one of [`SERVICES`]), ready to start.
///
/// # Panics
/// An unknown name.
pub fn service(name: &str, ledger: Ledger, settings: StreamSettings) -> Service {
    service_with_deadline(name, ledger, settings, PAYMENT_DEADLINE)
}

/// [`service`], with the orders' payment deadline `deadline`: longer than
/// any payments outage a run means to survive (a run that kills nodes
/// needs more than the 4–9 s of an election), or a late payment would
/// find its order expired.
///
/// # Panics
/// An unknown name.
pub fn service_with_deadline(
    name: &str,
    ledger: Ledger,
    settings: StreamSettings,
    deadline: Duration,
) -> Service {
    let s = Service::new(name)
        .state(ledger.clone())
        .stream_settings(settings.clone())
        .shutdown_grace(Duration::from_secs(10));
    match name {
        "orders" => s
            .handler(confirm_payment)
            .handler(reject_order)
            .handler(cancel_order)
            .handler(notify_customer)
            .deadline_within(expire_unpaid, deadline),
        "payments" => s
            .handler(charge_payment)
            .handler(refund_payment)
            .handler(refund_refused_payment),
        "inventory" => {
            let publisher = Publisher::new(ledger.js.client(), name)
                .expect("a service name is a legal source")
                .stream_settings(settings);
            s.state(Aggregates::new(publisher)).handler(reserve_stock)
        }
        "shipping" => s.handler(ship_order),
        other => panic!("no service named {other:?}; the services are {SERVICES:?}"),
    }
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
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "orders={} shipped={} cancelled={} rejected={} expired={} notices={} late_refunds={} duplicates={} misordered={} lost={} ended_twice={} unrefunded={}",
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
            self.unrefunded
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
/// duplicates in the event streams and the ledger, and the customers'
/// notices in the ledger.
///
/// # Errors
/// The ledger could not be read whole: the count would be a guess, so the
/// run must fail rather than pass.
pub async fn summarize(
    recorder: &Recorder,
    client: &async_nats::Client,
    run: &str,
    n: u64,
) -> Result<Summary, LedgerError> {
    let (mut summary, duplicate_ids) = scan(recorder, run, n);
    let ledger = read_ledger(client, run).await?;
    summary.duplicates = duplicate_ids + ledger.duplicates;
    summary.notices = ledger.notices;
    summary.misordered = ledger.misordered;
    Ok(summary)
}

/// The ledger could not be read, so duplicates cannot be counted.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the ledger stream {LEDGER_STREAM} to count duplicate effects: {0}")]
pub struct LedgerError(String);

/// The endings of `run`'s orders (no ledger scan: cheap enough for a
/// progress display), with `notices`, `duplicates` and `misordered` left
/// at 0.
pub fn summarize_endings(recorder: &Recorder, run: &str, n: u64) -> Summary {
    scan(recorder, run, n).0
}

/// The endings of `run`'s orders, and how many of its event ids the streams
/// hold more than once.
fn scan(recorder: &Recorder, run: &str, n: u64) -> (Summary, u64) {
    scan_records(&recorder.snapshot(), run, n)
}

/// [`scan`] over recorded events.
fn scan_records(records: &[choreo_testkit::Recorded], run: &str, n: u64) -> (Summary, u64) {
    let prefix = format!("{run}-");
    // Every ending an order has, not the last only: an order that ended
    // twice must show.
    let mut ended: HashMap<&str, Vec<&'static str>> = HashMap::new();
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
        ended.entry(order).or_default().push(ending);
    }
    let count = |what| {
        ended
            .values()
            .filter(|v| v.len() == 1 && v[0] == what)
            .count() as u64
    };
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
        lost: n.saturating_sub(ended.len() as u64),
        ended_twice: ended.values().filter(|v| v.len() > 1).count() as u64,
        late_refunds,
        unrefunded: refused.len() as u64 - late_refunds,
    };
    (summary, duplicate_ids)
}

/// What the ledger holds of a run.
#[derive(Default)]
struct LedgerCount {
    /// Effects recorded more than once.
    duplicates: u64,
    /// Tracking notices.
    notices: u64,
    /// Orders with a notice recorded after a later one.
    misordered: u64,
}

impl LedgerCount {
    /// Counts a ledger subject if it is a notice, and its order as
    /// misordered (once) if it comes after a later step of that order.
    fn notice(&mut self, last: &mut HashMap<String, (u32, bool)>, subject: &str) {
        let Some((step, order)) = notice(subject) else {
            return;
        };
        self.notices += 1;
        let (last, wrong) = last.entry(order.to_owned()).or_insert((0, false));
        if step < *last && !*wrong {
            *wrong = true;
            self.misordered += 1;
        }
        *last = (*last).max(step);
    }
}

/// Reads `run`'s effects in the ledger: one pass over the stream's headers
/// (an ordered consumer, no payloads), in stream order, up to its last
/// message when the count starts.
async fn read_ledger(client: &async_nats::Client, run: &str) -> Result<LedgerCount, LedgerError> {
    use futures::StreamExt;
    let fail = |e: &dyn std::fmt::Display| LedgerError(e.to_string());
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(LEDGER_STREAM).await.map_err(|e| fail(&e))?;
    let info = stream.info().await.map_err(|e| fail(&e))?;
    let last = info.state.last_sequence;
    if info.state.messages == 0 {
        return Ok(LedgerCount::default());
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            headers_only: true,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| fail(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
    let marker = format!(".{run}-");
    let mut seen = HashSet::new();
    let mut count = LedgerCount::default();
    // Per order, the last notice's step, and whether one came out of order.
    let mut last_notice: HashMap<String, (u32, bool)> = HashMap::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| LedgerError("no message for 10 s while reading it".into()))?
            .ok_or_else(|| LedgerError("the read ended early".into()))?
            .map_err(|e| fail(&e))?;
        let seq = next.info().map_err(|e| fail(&e))?.stream_sequence;
        if next.subject.contains(&marker) {
            if !seen.insert(next.subject.to_string()) {
                count.duplicates += 1;
            } else {
                count.notice(&mut last_notice, &next.subject);
            }
        }
        if seq >= last {
            return Ok(count);
        }
    }
}

/// The step and order of a notice's ledger subject,
/// `ledger.orders.notice-<step>.<order>`.
fn notice(subject: &str) -> Option<(u32, &str)> {
    let mut t = subject.split('.');
    let (_, _, effect, order) = (t.next()?, t.next()?, t.next()?, t.next()?);
    Some((effect.strip_prefix("notice-")?.parse().ok()?, order))
}

/// Waits until every order of `run` has ended and its customer got its
/// notices, or nothing has changed for `stall`; `progress` is called with
/// the running summary.
///
/// # Errors
/// See [`summarize`].
pub async fn wait_for_endings(
    recorder: &Recorder,
    client: &async_nats::Client,
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
    // The notices follow the shipments: read the ledger until they are all
    // there, or stop changing.
    let mut last_notices = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let s = summarize(recorder, client, run, n).await?;
        if s.notices >= s.shipped * u64::from(TRACKING_STEPS) || last_change.elapsed() > stall {
            return Ok(s);
        }
        if s.notices != last_notices {
            last_notices = s.notices;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_after_a_later_one_counts_its_order_as_misordered() {
        let mut count = LedgerCount::default();
        let mut last = HashMap::new();
        for subject in [
            "ledger.orders.notice-1.r-1",
            "ledger.orders.notice-2.r-1",
            "ledger.orders.notice-2.r-2",
            "ledger.orders.notice-1.r-2",
            "ledger.shipping.ship.r-2",
        ] {
            count.notice(&mut last, subject);
        }
        assert_eq!((count.notices, count.misordered), (4, 1));
    }
}
