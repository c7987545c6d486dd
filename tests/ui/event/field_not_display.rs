use choreo::event;

#[derive(serde::Serialize, serde::Deserialize)]
pub struct OrderId(u64);

#[event(subject = "orders.{order_id}.placed", key = order_id)]
pub struct OrderPlaced {
    pub order_id: OrderId,
}

fn main() {}
