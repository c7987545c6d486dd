use choreo::event;

#[event(name = "PriceSet", subject = "prices.set")]
pub struct PriceSetV0 {
    pub cents: u32,
}

#[event(subject = "prices.set", upcast_from = PriceSetV0)]
pub struct PriceSet {
    pub cents: u64,
}

fn main() {}
