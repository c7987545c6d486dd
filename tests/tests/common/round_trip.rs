//! A one-hop flow for tests that only need to see a service work over some
//! connection (secured servers, logs).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

use choreo::{Context, Publisher, Service, event, event_handler};
use choreo_testkit::Recorder;

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: String,
}

#[event(subject = "payments.{order_id}.captured")]
pub struct PaymentCaptured {
    pub order_id: String,
}

#[event_handler]
pub async fn charge(order: OrderPlaced, ctx: Context) {
    ctx.emit(PaymentCaptured {
        order_id: order.order_id,
    });
}

/// A service on `client` handles an event published on `client`.
pub async fn round_trip(client: choreo::async_nats::Client) {
    let recorder = Recorder::start(&client).await.unwrap();
    let svc = Service::new("payments")
        .handler(charge)
        .start(client.clone())
        .await
        .unwrap();
    let root = Publisher::new(client, "checkout")
        .unwrap()
        .publish(&OrderPlaced {
            order_id: "o-1".into(),
        })
        .await
        .unwrap();
    recorder
        .expect::<PaymentCaptured>()
        .in_flow(root.event_id)
        .within(Duration::from_secs(10))
        .await
        .unwrap();
    svc.shutdown().await;
}
