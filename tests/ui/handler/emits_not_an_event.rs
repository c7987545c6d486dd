#![allow(unused)]

use choreo::{event, event_handler, Context};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

pub struct Receipt {
    pub order_id: String,
}

/// `emits` names event types: `Receipt` is not one.
#[event_handler(emits = [Receipt])]
async fn charge(order: OrderPlaced, ctx: Context) {}

fn main() {}
