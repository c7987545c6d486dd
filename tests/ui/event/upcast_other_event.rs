use choreo::event;

#[event(subject = "prices.set")]
pub struct PriceSetV1 {
    pub cents: u32,
}

#[event(name = "PriceSet", version = 2, subject = "prices.set", upcast_from = PriceSetV1)]
pub struct PriceSet {
    pub cents: u64,
}

impl From<PriceSetV1> for PriceSet {
    fn from(v1: PriceSetV1) -> Self {
        Self { cents: v1.cents.into() }
    }
}

fn main() {}
