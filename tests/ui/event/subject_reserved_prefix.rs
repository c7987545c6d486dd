use choreo::event;

#[event(subject = "$JS.orders.placed")]
pub struct OrderPlaced {
    pub id: u64,
}

#[event(subject = "choreo.orders.shipped")]
pub struct OrderShipped {
    pub id: u64,
}

fn main() {}
