#![allow(unused)]

use choreo::{event, event_handler, Context, HandlerError};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event_handler]
pub struct Charge;

fn main() {}
