#![allow(unused)]

use choreo::{event, event_handler, Context, HandlerError};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

async fn charge(order: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    Ok(())
}

fn build() {
    let _ = choreo::Service::new("payments").handler(charge);
}

fn main() {}
