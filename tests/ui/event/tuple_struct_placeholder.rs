use choreo::event;

#[event(subject = "orders.{0}.placed")]
pub struct OrderPlaced(pub u64);

fn main() {}
