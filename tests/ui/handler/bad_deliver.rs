#![allow(unused)]

use choreo::{event, event_handler, Context, HandlerError};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event_handler(deliver = sometimes)]
async fn charge(order: OrderPlaced) {}

#[event_handler(deliver_since = "yesterday")]
async fn refund(order: OrderPlaced) {}

#[event_handler(deliver = new, deliver_since = "2026-01-01T00:00:00Z")]
async fn audit(order: OrderPlaced) {}

fn main() {}
