use choreo::event;

#[event(subject = "{tenant}.orders.placed")]
pub struct OrderPlaced {
    pub tenant: String,
}

fn main() {}
