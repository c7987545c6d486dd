use choreo::event;

#[event(subject = "orders.{order_id}.placed")]
pub struct OrderPlaced {
    pub id: u64,
    pub total_cents: u64,
}

fn main() {}
