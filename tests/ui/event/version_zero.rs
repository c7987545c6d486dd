use choreo::event;

#[event(subject = "orders.placed", version = 0)]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
