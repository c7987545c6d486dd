use choreo::event;

#[event(version = 2)]
pub struct OrderPlaced {
    pub id: u64,
}

fn main() {}
