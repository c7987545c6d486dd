#![allow(unused)]

use choreo::{event, event_handler};

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "audit.noted")]
pub struct Noted {
    pub text: String,
}

pub struct NotAnEvent;

// Matching by key needs a key on both sides.
#[event_handler(within = "15m", unless = Noted, matched_by = key)]
async fn by_key(o: OrderPlaced) {}

// `unless` names an event type.
#[event_handler(within = "15m", unless = NotAnEvent)]
async fn not_event(o: OrderPlaced) {}

// A deadline handler is registered with `Service::deadline`, and only one.
#[choreo::event_handler]
async fn plain(o: OrderPlaced) {}

fn build() {
    let _ = choreo::Service::new("orders").deadline(plain);
}

fn main() {}
