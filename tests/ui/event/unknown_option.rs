use choreo::event;

#[event(subject = "orders.placed", retention = "7d")]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
