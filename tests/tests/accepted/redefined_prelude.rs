// The expansion must use absolute paths only: shadow the prelude and common
// names and it still compiles.
#![no_implicit_prelude]

extern crate choreo;
extern crate std as _std;

#[allow(dead_code)]
struct Result;
#[allow(dead_code)]
struct Option;
#[allow(dead_code)]
struct String;
#[allow(dead_code)]
struct Vec;
#[allow(dead_code)]
trait From {}
#[allow(dead_code)]
mod core {}
#[allow(dead_code)]
mod serde {}

#[choreo::event(subject = "orders.{order_id}.placed", key = order_id, version = 2, upcast_from = OrderPlacedV1)]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[choreo::event(name = "OrderPlaced", subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlacedV1 {
    pub order_id: u64,
}

impl ::core::convert::From<OrderPlacedV1> for OrderPlaced {
    fn from(v: OrderPlacedV1) -> Self {
        OrderPlaced {
            order_id: v.order_id,
        }
    }
}

#[choreo::event_handler(concurrency = 2, backoff = ["1s"])]
async fn on_order(
    order: OrderPlaced,
    ctx: choreo::Context,
) -> ::core::result::Result<(), choreo::HandlerError> {
    let _ = (order.order_id, ctx);
    ::core::result::Result::Ok(())
}

#[choreo::event_handler]
async fn on_order_unit(_order: OrderPlaced) {}

pub(crate) fn main() {}
