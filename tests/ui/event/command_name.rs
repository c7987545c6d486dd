use choreo::event;

#[event(subject = "orders.create")]
pub struct CreateOrder {
    pub id: u64,
}

#[event(subject = "payments.process", name = "ProcessPayment")]
pub struct PaymentProcessed {
    pub id: u64,
}

#[event(subject = "mail.send")]
pub struct SendEmail {
    pub to: String,
}

fn main() {}
