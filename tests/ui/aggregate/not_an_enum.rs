use choreo::AggregateEvent;

#[derive(AggregateEvent)]
pub struct StockEvent {
    pub qty: u32,
}

fn main() {}
