#![allow(unused)]

use std::rc::Rc;

use choreo::{event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

async fn charge_card() {}

/// An `Rc` held across an await makes the future `!Send`: handlers run on a
/// multi-threaded runtime.
#[event_handler]
async fn charge(order: OrderPlaced) {
    let shared = Rc::new(order.order_id);
    charge_card().await;
    drop(shared);
}

fn main() {}
