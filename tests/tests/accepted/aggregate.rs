use choreo::{Aggregate, AggregateEvent, event};

#[event(subject = "stock.{sku}.received")]
pub struct StockReceived {
    pub sku: String,
    pub qty: u32,
}

#[derive(AggregateEvent)]
pub enum StockEvent {
    Received(StockReceived),
}

#[derive(Default, Clone)]
pub struct Stock {
    on_hand: u32,
}

impl Aggregate for Stock {
    const NAME: &'static str = "Stock";
    type Event = StockEvent;
    fn filter(sku: &str) -> String {
        format!("stock.{sku}.*")
    }
    fn apply(&mut self, event: &StockEvent) {
        let StockEvent::Received(e) = event;
        self.on_hand += e.qty;
    }
}

pub(crate) fn main() {
    assert_eq!(
        <StockEvent as AggregateEvent>::TYPES[0].name,
        "StockReceived"
    );
    let _ = Stock::default().on_hand;
}
