use choreo::AggregateEvent;

pub struct Plain {
    pub qty: u32,
}

#[derive(AggregateEvent)]
pub enum StockEvent {
    Plain(Plain),
}

fn main() {}
