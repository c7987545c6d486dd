use choreo::{
    Attempt, Context, Envelope, Handler, HandlerError, Metadata, State, event, event_handler,
};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[derive(Clone)]
pub struct Db;

#[derive(Debug)]
pub struct MyError;
impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mine")
    }
}
impl std::error::Error for MyError {}

/// Documented handlers keep their docs.
#[event_handler(
    name = "charge_v2",
    concurrency = 32,
    max_deliver = 7,
    backoff = ["500ms", "2s", "1m"],
    ack_wait = "45s",
    deliver = new,
    idempotent = false,
    crate = "::choreo",
)]
pub async fn charge(
    order: OrderPlaced,
    ctx: Context,
    State(_db): State<Db>,
    Attempt(_n): Attempt,
) -> Result<(), HandlerError> {
    let _ = (order.order_id, ctx.idempotency_key());
    Ok(())
}

#[event_handler(deliver_since = "2026-01-01T00:00:00Z")]
async fn audit(order: Envelope<OrderPlaced>, meta: Metadata) -> Result<(), MyError> {
    let _ = (order.meta().id(), meta.id());
    Err(MyError)
}

#[event_handler]
async fn unit(_order: OrderPlaced) {}

pub(crate) fn main() {
    let o = charge.options();
    assert_eq!(charge.name(), "charge_v2");
    assert_eq!((o.concurrency, o.max_deliver, o.idempotent), (32, 7, false));
    assert_eq!(o.backoff.len(), 3);
    assert_eq!(o.ack_wait, std::time::Duration::from_secs(45));
    assert_eq!(o.deliver, choreo::DeliverPolicy::New);
    assert!(matches!(
        audit.options().deliver,
        choreo::DeliverPolicy::Since(_)
    ));
    assert_eq!(unit.name(), "unit");
    let _ = choreo::Service::new("x")
        .state(Db)
        .handler(charge)
        .handler(audit)
        .handler(unit);
}
