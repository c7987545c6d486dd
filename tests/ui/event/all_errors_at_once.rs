use choreo::event;

#[event(subject = "orders.{missing}.placed", version = 0, colour = "red", key = nope)]
pub struct PlaceOrder {
    pub id: u64,
}

fn main() {}
