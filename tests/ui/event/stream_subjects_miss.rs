use choreo::event;

// A literal where the subject has a placeholder: most orders' events would
// not be stored.
#[event(subject = "orders.{id}.placed", stream = "ORDERS_PLACED", stream_subjects = "orders.o-1.placed")]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
