use choreo::{event, AggregateEvent};

#[event(subject = "stock.{sku}.received")]
pub struct StockReceived {
    pub sku: String,
}

#[derive(AggregateEvent)]
pub enum StockEvent {
    Received(StockReceived),
    Empty,
    Two(StockReceived, StockReceived),
    Named { event: StockReceived },
}

fn main() {}
