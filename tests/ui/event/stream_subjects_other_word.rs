use choreo::event;

// `>` would store every subject of the account, NATS's own among them.
#[event(subject = "orders.{id}.placed", stream = "EVERYTHING", stream_subjects = ">")]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
