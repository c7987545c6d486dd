use choreo::event;

#[event(subject = "orders.*.placed")]
pub struct OrderPlaced {
    pub id: u64,
}

#[event(subject = "orders..shipped")]
pub struct OrderShipped {
    pub id: u64,
}

#[event(subject = "orders.{id}-x.paid")]
pub struct OrderPaid {
    pub id: u64,
}

fn main() {}
