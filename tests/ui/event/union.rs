use choreo::event;

#[event(subject = "raw.bits")]
pub union BitsReceived {
    pub int: u32,
    pub float: f32,
}

fn main() {}
