#![allow(unused)]

use choreo::{event, event_handler, Context, HandlerError};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event_handler(ack_wait = "30", backoff = ["1s", "fast"])]
async fn charge(order: OrderPlaced) {}

#[event_handler(ack_wait = "10ms", backoff = [])]
async fn refund(order: OrderPlaced) {}

fn main() {}
