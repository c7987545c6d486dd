#![allow(unused)]

use choreo::{event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event(subject = "audit.noted")]
pub struct Noted {
    pub text: String,
}

// Within how long of what? `unless` is missing.
#[event_handler(within = "15m")]
async fn a(o: OrderPlaced) {}

// `unless` without `within`.
#[event_handler(unless = PaymentCaptured)]
async fn b(o: OrderPlaced) {}

// Too short, and not a duration.
#[event_handler(within = "10ms", unless = PaymentCaptured)]
async fn c(o: OrderPlaced) {}

#[event_handler(within = "soon", unless = PaymentCaptured)]
async fn d(o: OrderPlaced) {}

// Matched by what?
#[event_handler(within = "15m", unless = PaymentCaptured, matched_by = order_id)]
async fn e(o: OrderPlaced) {}

// `matched_by` without a deadline.
#[event_handler(matched_by = key)]
async fn f(o: OrderPlaced) {}

// A deadline cannot be ordered, nor choose where it starts.
#[event_handler(within = "15m", unless = PaymentCaptured, ordered_by = order_id)]
async fn g(o: OrderPlaced) {}

#[event_handler(within = "15m", unless = PaymentCaptured, deliver = all)]
async fn h(o: OrderPlaced) {}

// `unless` names at least one event.
#[event_handler(within = "15m", unless = [])]
async fn i(o: OrderPlaced) {}

fn main() {}
