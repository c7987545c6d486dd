use choreo::event;

#[event(subject = "orders.placed", stream = "orders.v1")]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
