use choreo::event;

#[event(subject = "carts.{cart_id}.line_added", key = (cart_id, line_no))]
pub struct LineAdded {
    pub cart_id: u64,
    pub line: u32,
}

fn main() {}
