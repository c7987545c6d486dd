#![allow(unused)]

use choreo::{event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

/// A status code is not an error: `?` cannot make a `HandlerError` of it.
#[event_handler]
async fn charge(order: OrderPlaced) -> Result<(), u16> {
    Err(402)
}

fn main() {}
