//! A deadline handler registered with `Service::handler` is a compile error:
//! it runs as several consumers, which `Service::deadline` sets up.
use choreo::{event, event_handler, Service};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured", key = order_id)]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event_handler(within = "15m", unless = PaymentCaptured)]
async fn cancel_unpaid(_order: OrderPlaced) {}

fn main() {
    let _ = Service::new("orders").handler(cancel_unpaid);
}
