use choreo::event;

#[event(name = "PriceSet", subject = "prices.set")]
pub struct PriceSetV1 {
    pub cents: u32,
}

#[event(name = "PriceSet", version = 2, subject = "prices.set", upcast_from = PriceSetV1)]
pub struct PriceSet {
    pub cents: u64,
}

fn main() {}
