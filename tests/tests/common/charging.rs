//! A handler that charges orders and dead-letters those with nothing to
//! charge, for tests that run a service under a particular setup (a
//! JetStream domain, least permissions).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use choreo::{Context, HandlerError, event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
#[derive(Debug, Clone)]
pub struct OrderPlaced {
    pub order_id: String,
    pub total_cents: u64,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
#[derive(Debug, Clone)]
pub struct PaymentCaptured {
    pub order_id: String,
}

/// An order of 0 cents fails permanently: one dead letter.
#[event_handler(max_deliver = 2, backoff = ["100ms"])]
pub async fn charge(order: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    if order.total_cents == 0 {
        return Err(HandlerError::permanent(std::io::Error::other(
            "nothing to charge",
        )));
    }
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
    Ok(())
}

/// Order `i` of a test: order 7 has nothing to charge.
pub fn order(i: usize) -> OrderPlaced {
    OrderPlaced {
        order_id: format!("o-{i}"),
        total_cents: if i == 7 { 0 } else { 250 },
    }
}
