use choreo::event;

#[event(subject = "orders.placed", version = 1, version = 2)]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
