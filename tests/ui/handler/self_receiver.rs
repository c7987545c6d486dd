#![allow(unused)]

use choreo::{event, event_handler, Context, HandlerError};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

pub struct Payments;

impl Payments {
    #[event_handler]
    async fn charge(&self, order: OrderPlaced) {}
}

fn main() {}
