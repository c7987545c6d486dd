use choreo::event;

#[event(subject = "orders.placed")]
fn order_placed() {}

fn main() {}
