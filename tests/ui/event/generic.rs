use choreo::event;

#[event(subject = "things.{id}.seen")]
pub struct ThingSeen<T> {
    pub id: u64,
    pub thing: T,
}

fn main() {}
